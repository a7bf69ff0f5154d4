package bus

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// Publisher publishes a sequence of messages (capture: one source's
// changes; router: its outputs) to JetStream asynchronously, in order, and
// tells which marked positions are wholly acknowledged.
//
// Every message carries Pgs2-Msg-Id (its identity, which resume reads back)
// and Nats-Expected-Last-Sequence (the stream sequence its predecessor
// took), so JetStream refuses a message whose predecessor is not stored:
// the stream stays a gapless prefix of what its single writer published
// even when publishes fail out of order (a server restart, a lost
// connection, a leader election). After the first failure the publisher is
// broken: its owner rebuilds it from the stream's last stored message.
//
// Why a sequence and not Nats-Expected-Last-Msg-Id: on a replicated stream
// every replica re-checks the last msg id when it applies a message, and a
// mismatch there (the id is kept in memory and diverges across leader
// changes) is a write error that stops the replica for good; the expected
// last sequence is checked only by the leader, against the stream's own
// sequence, including the messages still being replicated, so publishes
// pipeline. And no Nats-Msg-Id: JetStream checks it before the chain, so a
// message equal to a stored one is acknowledged as a duplicate without
// moving the stream, and the next one then breaks the chain (a republished
// round would stall for the duplicate window).
//
// It speaks the JetStream publish protocol directly (a core publish with a
// reply subject per message, one subscription for all PubAcks) and reuses
// its message and headers, so a publish allocates only its reply subject.
type Publisher struct {
	nc      *nats.Conn
	sub     *nats.Subscription
	status  chan nats.Status
	inbox   string // "_INBOX.<id>."
	timeout time.Duration

	// Publishing goroutine only.
	msg    nats.Msg
	idVal  []string
	expVal []string
	base   uint64        // the stream's last sequence before the first message
	expBuf []byte        // scratch for the expected sequence
	slots  chan struct{} // one per message awaiting its PubAck

	published atomic.Uint64 // sequence of the last published message
	confirmed atomic.Uint64

	mu           sync.Mutex
	acked        []bool // ring over sequences, by seq % len
	ackedThrough uint64 // every message up to here is acknowledged
	markers      []marker
	progress     time.Time

	errOnce sync.Once
	err     error
	failed  chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

type marker struct {
	seq uint64 // the last message published when the position was marked
	pos uint64
}

// PublisherOptions tune a Publisher.
type PublisherOptions struct {
	// Window is how many messages may await their PubAck (default 4096).
	Window int
	// AckTimeout fails the publisher when no PubAck arrives for this long
	// while messages are outstanding (default 10s).
	AckTimeout time.Duration
}

// NewPublisher returns a publisher whose first message follows the
// stream's message at lastSeq (its State.LastSeq; 0 for a stream never
// written). acked is the position Acked starts at.
func NewPublisher(nc *nats.Conn, lastSeq uint64, acked uint64, o PublisherOptions) (*Publisher, error) {
	if o.Window <= 0 {
		o.Window = 4096
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = 10 * time.Second
	}
	p := &Publisher{
		nc:       nc,
		inbox:    nc.NewInbox() + ".",
		timeout:  o.AckTimeout,
		idVal:    make([]string, 1),
		expVal:   make([]string, 1),
		base:     lastSeq,
		slots:    make(chan struct{}, o.Window),
		acked:    make([]bool, o.Window),
		progress: time.Now(),
		failed:   make(chan struct{}),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	p.msg.Header = nats.Header{HeaderID: p.idVal, HeaderExpectedLastSeq: p.expVal}
	p.confirmed.Store(acked)
	p.status = nc.StatusChanged(nats.DISCONNECTED, nats.RECONNECTING, nats.CLOSED)
	sub, err := nc.Subscribe(p.inbox+"*", p.onAck)
	if err != nil {
		nc.RemoveStatusListener(p.status)
		return nil, fmt.Errorf("subscribe for PubAcks: %w", err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	p.sub = sub
	go p.watch()
	return p, nil
}

// Publish sends one message (capture: a round's batch of changes for one
// subject; router: of routed changes) with Pgs2-Msg-Id id, and the headers
// set with SetHeader. It blocks only while the window is full.
func (p *Publisher) Publish(ctx context.Context, subject, id string, body []byte) error {
	select {
	case p.slots <- struct{}{}:
	case <-p.failed:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
	seq := p.published.Load() + 1
	p.idVal[0] = id
	p.expBuf = strconv.AppendUint(p.expBuf[:0], p.base+seq-1, 10)
	p.expVal[0] = string(p.expBuf)
	p.msg.Subject = subject
	p.msg.Reply = p.inbox + strconv.FormatUint(seq, 10)
	p.msg.Data = body
	p.published.Store(seq)
	if err := p.nc.PublishMsg(&p.msg); err != nil { // copies headers and body
		p.fail(fmt.Errorf("publish %s: %w", subject, err))
		return p.err
	}
	return nil
}

// pubAck is JetStream's answer to a publish.
type pubAck struct {
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
}

var errorField = []byte(`"error"`)

// errCodeWrongLastSequence is JetStream's JSStreamWrongLastSequenceErr.
const errCodeWrongLastSequence = 10071

// ErrChainBroken means JetStream refused a message because its
// predecessor is not the stream's last message: another message took its
// place (another writer, or a message of an earlier session still in
// flight) or an earlier one was lost. The owner rebuilds the publisher from
// what the stream holds.
var ErrChainBroken = errors.New("the stream's last message is not this one's predecessor")

func (p *Publisher) onAck(m *nats.Msg) {
	seq, err := strconv.ParseUint(m.Subject[len(p.inbox):], 10, 64)
	if err != nil {
		return
	}
	if len(m.Data) == 0 {
		if m.Header.Get("Status") == "503" {
			p.fail(fmt.Errorf("publish message %d: no responders: no JetStream stream takes its subject, or the stream has no leader (an election)", seq))
		} else {
			p.fail(fmt.Errorf("publish: empty PubAck (status %q)", m.Header.Get("Status")))
		}
		return
	}
	if bytes.Contains(m.Data, errorField) {
		var a pubAck
		if err := json.Unmarshal(m.Data, &a); err != nil || a.Error != nil {
			desc := string(m.Data)
			if a.Error != nil {
				desc = fmt.Sprintf("%s (code %d, err_code %d)", a.Error.Description, a.Error.Code, a.Error.ErrCode)
			}
			err := fmt.Errorf("jetstream refused message %d: %s", seq, desc)
			if a.Error != nil && a.Error.ErrCode == errCodeWrongLastSequence {
				err = fmt.Errorf("%w: %w", ErrChainBroken, err)
			}
			p.fail(err)
			return
		}
	}
	p.mu.Lock()
	published := p.published.Load()
	if seq <= p.ackedThrough || seq > published {
		p.mu.Unlock()
		return
	}
	n := uint64(len(p.acked))
	p.acked[seq%n] = true
	released := 0
	for p.ackedThrough < published && p.acked[(p.ackedThrough+1)%n] {
		p.ackedThrough++
		p.acked[p.ackedThrough%n] = false
		released++
	}
	if released > 0 {
		p.progress = time.Now()
		i := 0
		for ; i < len(p.markers) && p.markers[i].seq <= p.ackedThrough; i++ {
			p.raise(p.markers[i].pos)
		}
		p.markers = p.markers[i:]
	}
	p.mu.Unlock()
	for ; released > 0; released-- {
		<-p.slots
	}
}

// Mark records a position (capture: a transaction's end LSN; router: an
// input message's stream sequence) reached by the messages published so
// far; once they are all acknowledged, Acked reaches pos. Positions must
// not decrease.
func (p *Publisher) Mark(pos uint64) {
	p.mu.Lock()
	if p.ackedThrough == p.published.Load() {
		p.raise(pos)
	} else {
		p.markers = append(p.markers, marker{seq: p.published.Load(), pos: pos})
	}
	p.mu.Unlock()
}

// SetHeader sets a header on every later message ("" removes it). Only the
// publishing goroutine may call it.
func (p *Publisher) SetHeader(name, value string) {
	if value == "" {
		delete(p.msg.Header, name)
		return
	}
	p.msg.Header[name] = []string{value}
}

func (p *Publisher) raise(pos uint64) {
	if p.Err() != nil {
		return
	}
	for {
		cur := p.confirmed.Load()
		if pos <= cur || p.confirmed.CompareAndSwap(cur, pos) {
			return
		}
	}
}

// watch fails the publisher when the connection drops (PubAcks in flight
// are then lost) or when PubAcks stop arriving.
func (p *Publisher) watch() {
	defer close(p.done)
	tick := time.NewTicker(p.timeout / 10)
	defer tick.Stop()
	for {
		select {
		case s := <-p.status:
			p.fail(fmt.Errorf("nats connection %s: PubAcks in flight are lost", s))
		case <-tick.C:
			p.mu.Lock()
			stalled := p.ackedThrough < p.published.Load() && time.Since(p.progress) > p.timeout
			p.mu.Unlock()
			if stalled {
				p.fail(fmt.Errorf("no PubAck for %s with %d messages outstanding", p.timeout, p.InFlight()))
			}
		case <-p.stop:
			return
		}
	}
}

func (p *Publisher) fail(err error) {
	p.errOnce.Do(func() {
		p.err = err
		close(p.failed)
	})
}

// Failed is closed at the first failure.
func (p *Publisher) Failed() <-chan struct{} { return p.failed }

// Err returns the first failure, if any.
func (p *Publisher) Err() error {
	select {
	case <-p.failed:
		return p.err
	default:
		return nil
	}
}

// Acked is the last marked position whose messages, and all before them,
// are acknowledged.
func (p *Publisher) Acked() uint64 { return p.confirmed.Load() }

// MarkIdle raises Acked to pos when every published message is
// acknowledged and nothing failed. The caller must not publish concurrently.
func (p *Publisher) MarkIdle(pos uint64) {
	p.mu.Lock()
	if p.ackedThrough == p.published.Load() {
		p.raise(pos)
	}
	p.mu.Unlock()
}

// InFlight is the number of messages not yet acknowledged.
func (p *Publisher) InFlight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return int(p.published.Load() - p.ackedThrough)
}

// ErrClosed is returned by Close when ctx ended before all PubAcks arrived.
var ErrClosed = errors.New("publisher closed with messages outstanding")

// Close waits until every published message is acknowledged (or the
// publisher failed, or ctx ends), then releases its subscription. It
// returns the first failure. Publish must not be called after Close.
func (p *Publisher) Close(ctx context.Context) error {
	defer func() {
		close(p.stop)
		<-p.done
		_ = p.sub.Unsubscribe()
		p.nc.RemoveStatusListener(p.status)
	}()
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for p.InFlight() > 0 {
		select {
		case <-p.failed:
			return p.err
		case <-ctx.Done():
			return fmt.Errorf("%w: %d: %w", ErrClosed, p.InFlight(), ctx.Err())
		case <-t.C:
		}
	}
	return p.Err()
}
