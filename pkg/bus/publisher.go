package bus

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Publisher publishes one source's changes asynchronously, in order, and
// tells which transactions are wholly acknowledged.
//
// Every message carries Nats-Msg-Id (its idempotency key) and
// Nats-Expected-Last-Msg-Id (its predecessor's key), so JetStream refuses a
// message whose predecessor is not stored: the stream stays a gapless prefix
// of the change sequence even when async publishes fail out of order (a
// server restart, a lost connection). After the first failure the publisher
// is broken: its owner rebuilds it from the stream's last stored change.
type Publisher struct {
	js      jetstream.JetStream
	lastKey string

	queue chan entry

	published atomic.Int64 // messages handed to JetStream
	acked     atomic.Int64 // messages acknowledged
	confirmed atomic.Uint64

	errOnce sync.Once
	err     error
	failed  chan struct{}
	done    chan struct{}
}

type entry struct {
	f      jetstream.PubAckFuture
	endLSN uint64 // marker: a transaction ended here
}

// NewPublisher returns a publisher whose first message follows lastKey (the
// stream's last stored key; "" for an empty stream). confirmed is the LSN
// already confirmed to Postgres.
func NewPublisher(js jetstream.JetStream, lastKey string, confirmed uint64, window int) *Publisher {
	p := &Publisher{
		js:      js,
		lastKey: lastKey,
		queue:   make(chan entry, window),
		failed:  make(chan struct{}),
		done:    make(chan struct{}),
	}
	p.confirmed.Store(confirmed)
	go p.track()
	return p
}

// Publish sends one change. It blocks only when the in-flight window is full.
func (p *Publisher) Publish(ctx context.Context, subject, key string, group []byte, body []byte) error {
	if err := p.Err(); err != nil {
		return err
	}
	h := nats.Header{HeaderMsgID: []string{key}, HeaderGroup: []string{string(group)}}
	if p.lastKey != "" {
		h[HeaderExpectedLastID] = []string{p.lastKey}
	}
	f, err := p.js.PublishMsgAsync(&nats.Msg{Subject: subject, Header: h, Data: body})
	if err != nil {
		p.fail(fmt.Errorf("publish %s: %w", subject, err))
		return p.err
	}
	p.lastKey = key
	p.published.Add(1)
	return p.enqueue(ctx, entry{f: f})
}

// EndTx marks the end of a transaction whose messages were all published;
// once they are acknowledged, Confirmed reaches endLSN.
func (p *Publisher) EndTx(ctx context.Context, endLSN uint64) error {
	return p.enqueue(ctx, entry{endLSN: endLSN})
}

func (p *Publisher) enqueue(ctx context.Context, e entry) error {
	select {
	case p.queue <- e:
		return nil
	case <-p.failed:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *Publisher) track() {
	defer close(p.done)
	for e := range p.queue {
		if e.f == nil {
			if p.Err() == nil {
				p.raise(e.endLSN)
			}
			continue
		}
		select {
		case <-e.f.Ok():
			p.acked.Add(1)
		case err := <-e.f.Err():
			p.fail(fmt.Errorf("publish %s: %w", e.f.Msg().Subject, err))
			p.acked.Add(1)
		}
	}
}

func (p *Publisher) raise(lsn uint64) {
	for {
		cur := p.confirmed.Load()
		if lsn <= cur || p.confirmed.CompareAndSwap(cur, lsn) {
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

// Confirmed is the end LSN of the last transaction whose messages, and all
// before them, are acknowledged.
func (p *Publisher) Confirmed() uint64 { return p.confirmed.Load() }

// ConfirmIdle raises Confirmed to lsn when every published message is
// acknowledged and nothing failed. The caller must not be inside a
// transaction and must not publish concurrently.
func (p *Publisher) ConfirmIdle(lsn uint64) {
	if p.Err() == nil && p.acked.Load() == p.published.Load() {
		p.raise(lsn)
	}
}

// InFlight is the number of messages not yet acknowledged.
func (p *Publisher) InFlight() int64 { return p.published.Load() - p.acked.Load() }

// Close waits until every published message is acknowledged or failed and
// returns the first failure. Publish must not be called after Close.
func (p *Publisher) Close(ctx context.Context) error {
	close(p.queue)
	select {
	case <-p.done:
	case <-ctx.Done():
		return fmt.Errorf("waiting for %d acknowledgements: %w", p.InFlight(), ctx.Err())
	}
	return p.Err()
}
