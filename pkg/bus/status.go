package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
)

// Status requests: every capture, router and delivery process answers on
// its subject with what only it knows (its slot, its position, the S2
// streams it writes); the admin API gathers the answers. A process that
// does not answer is down (or cut off from NATS).
const (
	StatusRoot = "pgs2.status"
)

// StatusSubject is the subject every process of a role answers on (a
// request cannot go to a wildcard: one subject per role, and the answers
// name their source).
func StatusSubject(role string) string { return StatusRoot + "." + role }

// Process names the process that answers.
type Process struct {
	ID   string `json:"id"` // its lease or worker id
	Host string `json:"host"`
	PID  int    `json:"pid"`
}

// ThisProcess is this process with id.
func ThisProcess(id string) Process {
	h, _ := os.Hostname()
	return Process{ID: id, Host: h, PID: os.Getpid()}
}

// CaptureStatus is a capture's answer.
type CaptureStatus struct {
	Process
	Source string `json:"source"`
	Role   string `json:"role"` // active, standby
	Slot   string `json:"slot"`
	// The slot as the active capture read it last (SampleTime), from
	// pg_replication_slots and pg_stat_replication.
	SampleTime        time.Time `json:"sample_time,omitzero"`
	ConfirmedLSN      uint64    `json:"confirmed_lsn,omitempty"`
	WALEndLSN         uint64    `json:"wal_end_lsn,omitempty"` // pg_current_wal_lsn (on a replica: replayed)
	WALRetainedBytes  int64     `json:"wal_retained_bytes,omitempty"`
	LagBytes          int64     `json:"lag_bytes,omitempty"` // WAL end − confirmed
	LagSeconds        float64   `json:"lag_seconds,omitempty"`
	SlotError         string    `json:"slot_error,omitempty"`
	ChangesPublished  uint64    `json:"changes_published,omitempty"`
	LastCommitTimeMs  int64     `json:"last_commit_ms,omitempty"`
	ChangesStreamName string    `json:"changes_stream,omitempty"`
}

// RouterStatus is a router's answer.
type RouterStatus struct {
	Process
	Source string `json:"source"`
	Role   string `json:"role"` // active, standby
	// Of the changes stream: the last input routed, and how many of the
	// source's changes it holds beyond it (at the last input read).
	ChangesStream  string   `json:"changes_stream"`
	DeliveryStream string   `json:"delivery_stream"`
	LastInput      uint64   `json:"last_input,omitempty"`
	Pending        uint64   `json:"pending"`
	Disabled       []string `json:"disabled,omitempty"` // sinks the router routes nothing to
}

// UnitStatus is one S2 stream as the delivery process writing it knows it.
type UnitStatus struct {
	Sink   string `json:"sink"`
	Basin  string `json:"basin"`
	Stream string `json:"stream"`
	// State: delivering (changes wait for it), idle (nothing waits),
	// blocked (S2 refuses its appends), starting.
	State string `json:"state"`
	// Messages of its delivery streams not yet read (at the last read),
	// in all and per delivery stream.
	Pending   uint64            `json:"pending"`
	PendingBy map[string]uint64 `json:"pending_by,omitempty"`
	// The last change appended: its commit time and idempotency key
	// ("<lsn>:<idx>", base64 as in S2), and when it was appended.
	LastCommitMs int64     `json:"last_commit_ms,omitempty"`
	LastKey      string    `json:"last_key,omitempty"`
	LastAppend   time.Time `json:"last_append,omitzero"`
	// Commit time of the oldest change read and not yet appended (0: none).
	OldestWaitingMs int64  `json:"oldest_waiting_ms,omitempty"`
	ParkedGroups    int    `json:"parked_groups,omitempty"`
	LastError       string `json:"last_error,omitempty"`
}

// DeliveryStatus is a delivery process's answer.
type DeliveryStatus struct {
	Process
	Units []UnitStatus `json:"units"`
}

// ServeStatus answers requests on subject with what status returns, as
// JSON, until the subscription is drained.
func ServeStatus(nc *nats.Conn, subject string, status func() any) (*nats.Subscription, error) {
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		b, err := json.Marshal(status())
		if err != nil {
			return
		}
		_ = m.Respond(b)
	})
	if err != nil {
		return nil, fmt.Errorf("answer status requests on %s: %w", subject, err)
	}
	return sub, nil
}

// GatherStatus asks every process answering on subject (a wildcard may
// name several) and returns their answers: it waits up to wait, and
// stall after the last answer for the next.
func GatherStatus(ctx context.Context, nc *nats.Conn, subject string, wait, stall time.Duration) ([][]byte, error) {
	inbox := nc.NewRespInbox()
	ch := make(chan *nats.Msg, 256)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return nil, fmt.Errorf("gather status from %s: %w", subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subject, inbox, nil); err != nil {
		return nil, fmt.Errorf("gather status from %s: %w", subject, err)
	}
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	var stallC <-chan time.Time
	var out [][]byte
	for {
		select {
		case m := <-ch:
			if len(m.Data) > 0 {
				out = append(out, m.Data)
			}
			stallC = time.After(stall)
		case <-stallC:
			return out, nil
		case <-deadline.C:
			return out, nil
		case <-ctx.Done():
			return out, ctx.Err()
		}
	}
}
