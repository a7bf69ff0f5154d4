package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// LeaderMsg reads a message of a stream through the JetStream API, which
// the stream's leader answers: seq > 0 reads that message, else the last
// one on subject lastBy. A resume point must not come from a direct get
// (nats.go uses one whenever the stream allows it): any replica answers
// those, and one that lags the leader returns a message older than the
// LastSeq the chain goes on from, so the changes in between were published
// twice. jetstream.ErrMsgNotFound when there is none.
func LeaderMsg(ctx context.Context, js jetstream.JetStream, stream string, seq uint64, lastBy string) (*jetstream.RawStreamMsg, error) {
	return leaderGet(ctx, js, stream, msgGet{Seq: seq, LastBy: lastBy})
}

// LeaderNextMsg reads, as LeaderMsg does, the first message on subject (a
// filter) at or after sequence seq. An order must not come from a direct
// get either: a replica that lags says a park is empty that is not.
func LeaderNextMsg(ctx context.Context, js jetstream.JetStream, stream string, seq uint64, subject string) (*jetstream.RawStreamMsg, error) {
	return leaderGet(ctx, js, stream, msgGet{Seq: seq, NextBy: subject})
}

type msgGet struct {
	Seq    uint64 `json:"seq,omitempty"`
	LastBy string `json:"last_by_subj,omitempty"`
	NextBy string `json:"next_by_subj,omitempty"`
}

func leaderGet(ctx context.Context, js jetstream.JetStream, stream string, req msgGet) (*jetstream.RawStreamMsg, error) {
	b, _ := json.Marshal(req)
	prefix := js.Options().APIPrefix
	if prefix == "" {
		prefix = jetstream.DefaultAPIPrefix
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	msg, err := js.Conn().RequestWithContext(ctx, prefix+"STREAM.MSG.GET."+stream, b)
	if err != nil {
		return nil, fmt.Errorf("get a message of %s: %w", stream, err)
	}
	var resp struct {
		Message *struct {
			Subject string    `json:"subject"`
			Seq     uint64    `json:"seq"`
			Header  []byte    `json:"hdrs,omitempty"`
			Data    []byte    `json:"data,omitempty"`
			Time    time.Time `json:"time"`
		} `json:"message"`
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("get a message of %s: %w", stream, err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return nil, jetstream.ErrMsgNotFound
		}
		return nil, fmt.Errorf("get a message of %s: %w", stream, resp.Error)
	}
	if resp.Message == nil {
		return nil, fmt.Errorf("get a message of %s: an empty answer", stream)
	}
	m := &jetstream.RawStreamMsg{Subject: resp.Message.Subject, Sequence: resp.Message.Seq, Data: resp.Message.Data, Time: resp.Message.Time}
	if len(resp.Message.Header) > 0 {
		if m.Header, err = nats.DecodeHeadersMsg(resp.Message.Header); err != nil {
			return nil, fmt.Errorf("headers of message %d of %s: %w", m.Sequence, stream, err)
		}
	}
	return m, nil
}
