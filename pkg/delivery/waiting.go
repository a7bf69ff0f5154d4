package delivery

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/s2sink"
	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// maxWaitingUnits bounds how many unwritten S2 streams one status request
// measures (each costs an S2 read and two JetStream requests per
// delivery stream); the others show no pending figure.
const maxWaitingUnits = 64

// waitingTimeout bounds the measurement: a status request stays quick.
const waitingTimeout = 2 * time.Second

// fillWaiting measures what waits for the S2 streams no delivery process
// writes now (a paused or disabled sink's, or unowned): their resume point
// is read from S2 (the pgs2-through header), and what their delivery
// streams hold past it is counted by JetStream, with the store time of
// the oldest such message as the lag. A stream it cannot measure (no S2
// client for its sink, S2 or JetStream not answering in time, more than
// maxWaitingUnits of them) gets lag_seconds -1: unknown.
func (a *Admin) fillWaiting(ctx context.Context, now time.Time, streams map[Unit]*adminv1.StreamStatus, sink string) {
	var units []Unit
	for u, st := range streams {
		if st.Owner != "" || sink != "" && u.Sink != sink {
			continue
		}
		st.LagSeconds = -1 // unknown, unless measured below
		if a.s2For(u.Sink) != nil {
			units = append(units, u)
		}
	}
	// The same ones from one request to the next.
	slices.SortFunc(units, func(x, y Unit) int { return strings.Compare(x.String(), y.String()) })
	units = units[:min(len(units), maxWaitingUnits)]
	if len(units) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, waitingTimeout)
	defer cancel()
	srcs := a.deliverySources(ctx)
	var wg sync.WaitGroup
	var mu sync.Mutex
	sem := make(chan struct{}, 8)
	for _, u := range units {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			pending, oldest, ok := a.waitingOf(ctx, u, srcs)
			if !ok {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			st := streams[u]
			st.Pending, st.LagSeconds = pending, 0
			if pending > 0 && !oldest.IsZero() {
				st.LagSeconds = max(0, now.Sub(oldest).Seconds())
			}
		}()
	}
	wg.Wait()
}

// waitingOf counts the messages of u's delivery streams past its resume
// point in S2, and the oldest one's store time.
func (a *Admin) waitingOf(ctx context.Context, u Unit, srcs []source) (pending uint64, oldest time.Time, ok bool) {
	c := a.s2For(u.Sink)
	res, err := s2sink.FindResume(ctx, c, u.Basin, u.Stream)
	if notFound(err) {
		res.Through, err = bus.Progress{}, nil // nothing delivered yet
	}
	if err != nil {
		return 0, time.Time{}, false
	}
	for _, src := range srcs {
		cc := jetstream.ConsumerConfig{
			FilterSubjects:    []string{unitFilter(src, u)},
			AckPolicy:         jetstream.AckNonePolicy,
			MemoryStorage:     true,
			InactiveThreshold: 10 * time.Second,
		}
		if pos, has := res.Through[src.key]; has {
			// A message delivered only in part (a batch filled within it)
			// still waits, as the worker resumes at it.
			start := pos.Seq + 1
			if pos.Idx != bus.WholeMessage {
				start = pos.Seq
			}
			cc.DeliverPolicy, cc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, start
		}
		cons, err := a.js.CreateConsumer(ctx, src.name, cc)
		if err != nil {
			return 0, time.Time{}, false
		}
		info := cons.CachedInfo()
		n := info.NumPending
		if n > 0 {
			if b, err := cons.Fetch(1, jetstream.FetchMaxWait(500*time.Millisecond)); err == nil {
				for m := range b.Messages() {
					if md, err := m.Metadata(); err == nil && (oldest.IsZero() || md.Timestamp.Before(oldest)) {
						oldest = md.Timestamp
					}
				}
			}
		}
		_ = a.js.DeleteConsumer(context.WithoutCancel(ctx), src.name, info.Name)
		pending += n
	}
	return pending, oldest, true
}

// deliverySources lists every source's delivery stream with its key in
// delivery positions.
func (a *Admin) deliverySources(ctx context.Context) []source {
	names, err := bus.ListDeliveryStreams(ctx, a.js)
	if err != nil {
		return nil
	}
	var out []source
	for _, name := range names {
		st, err := a.js.Stream(ctx, name)
		if err != nil {
			continue // deleted since listed
		}
		if src, ok := sourceOf(st.CachedInfo()); ok {
			out = append(out, src)
		}
	}
	return out
}

// s2For is the sink's S2 client (nil when delivery could not build one).
func (a *Admin) s2For(sink string) *s2sink.Client {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.s2[sink]
}
