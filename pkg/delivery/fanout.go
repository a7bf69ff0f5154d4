package delivery

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// A unit's worker reads its messages from its source's delivery stream
// with a consumer filtered to the unit's subjects. Many such consumers
// on one stream cost the server in proportion to their number for every
// message: its file store finds a filtered consumer's next message by
// scanning the messages stored since its last one (the other units'), so
// with 1,000 units each message costs about 1,000 message reads
// (nats-server spent half its CPU in msgBlock.firstMatching, and the
// pipeline ran 13× slower at 1,000 S2 streams than at one).
//
// So a process reads each source's delivery stream once with one
// consumer over all of it (the server's cheapest read), and hands each
// attached unit its messages (fanout). A worker whose resume point the
// shared reader has not passed yet attaches at once; any other reads with
// its own consumer and attaches too: from the reader's position R on,
// every message of the unit goes into its feed, and the worker switches
// to the feed at its own consumer's first message past R (the feed holds
// that one and every later one; an ordered consumer delivered every
// earlier one). A feed that fills up (its worker is slow: S2 refuses or
// throttles it) is detached rather than block the other units, and its
// worker reads on its own again after its last message, as it does when
// the reader fails; it attaches again once caught up.
//
// A session attaches before it waits for its start slot and S2 (so its
// messages wait in the feed while thousands of sessions start), and the
// reader keeps a history of what it read, so an attaching unit gets the
// messages the reader passed a little before (a new unit's first: read
// while this process claimed it): docs/design.md.

// feedMessages and feedBytes bound a feed, fanoutBytes all of a
// process's feeds together (units whose sessions have not started yet
// wait in them: see worker.preattach).
const (
	feedMessages = 1024
	feedBytes    = 16 << 20
	fanoutBytes  = 256 << 20
)

// fanout is a process's readers, one per source's delivery stream.
type fanout struct {
	js  jetstream.JetStream
	ctx context.Context // the readers' lifetime
	log *slog.Logger
	// room is how many messages a feed holds (feedMessages; tests make
	// it small, so feeds detach and attach again).
	room int
	// histRoom is how many messages a reader's history holds
	// (histMessages; tests make it small).
	histRoom int
	// detached counts feeds detached for falling behind.
	detached atomic.Int64
	// replayed counts messages fed from a reader's history.
	replayed atomic.Int64
	// buffered is what all feeds hold (bytes).
	buffered atomic.Int64

	mu      sync.Mutex
	readers map[string]*streamReader // by source key
}

func newFanout(ctx context.Context, js jetstream.JetStream, log *slog.Logger) *fanout {
	return &fanout{js: js, ctx: ctx, log: log, room: feedMessages, histRoom: histMessages, readers: map[string]*streamReader{}}
}

// streamReader reads one delivery stream for the attached units.
type streamReader struct {
	fo  *fanout
	src source
	// behind is the reader's consumer's pending count at its last
	// message.
	behind atomic.Uint64

	mu    sync.Mutex
	pos   uint64           // the last sequence read
	feeds map[string]*feed // by unit prefix (feedPrefix)
	dead  bool
	// hist holds the messages read last (histMessages, histBytes), so
	// that a unit attaching a little after the reader passed its resume
	// point (a new stream's first message is read before its session
	// starts) gets them from here instead of catching up on a consumer
	// of its own.
	hist history
}

// History bounds: its messages and their bytes, each counted with
// msgOverhead for what a received message holds besides its data (its
// subject, headers, metadata: ~1 KiB).
const (
	histMessages = 1 << 16
	histBytes    = 64 << 20
	msgOverhead  = 1 << 10
)

// history is a reader's recent messages: every message read from
// sequence from on, in order, and by unit prefix.
type history struct {
	from     uint64
	held     fifo[*recentMsg]
	bytes    int64
	byPrefix map[string][]*recentMsg
}

type recentMsg struct {
	prefix string
	seq    uint64
	m      jetstream.Msg
}

// add records m, forgetting the oldest beyond room messages or
// histBytes.
func (h *history) add(prefix string, seq uint64, m jetstream.Msg, room int) {
	if h.byPrefix == nil {
		h.byPrefix = map[string][]*recentMsg{}
	}
	rm := &recentMsg{prefix: prefix, seq: seq, m: m}
	h.held.push(rm)
	h.byPrefix[prefix] = append(h.byPrefix[prefix], rm)
	h.bytes += int64(len(m.Data()) + msgOverhead)
	for h.held.len() > room || h.bytes > histBytes {
		old, _ := h.held.pop()
		h.bytes -= int64(len(old.m.Data()) + msgOverhead)
		h.from = old.seq + 1
		if q := h.byPrefix[old.prefix]; len(q) <= 1 {
			delete(h.byPrefix, old.prefix)
		} else {
			q[0] = nil
			h.byPrefix[old.prefix] = q[1:]
		}
	}
}

// since is prefix's messages from sequence from on (from must be at
// least h.from).
func (h *history) since(prefix string, from uint64) []*recentMsg {
	q := h.byPrefix[prefix]
	i, _ := slices.BinarySearchFunc(q, from, func(rm *recentMsg, seq uint64) int { return cmp.Compare(rm.seq, seq) })
	return q[i:]
}

// feed is one attached unit's messages, in order: a queue that grows as
// it fills (an idle unit's costs next to nothing; thousands of them wait
// attached while their sessions start).
type feed struct {
	r      *streamReader
	prefix string
	mu     sync.Mutex
	q      fifo[jetstream.Msg]
	bytes  int64
	ready  chan struct{} // signalled when a message is queued
	gone   chan struct{} // closed once detached: nothing more is queued
	once   sync.Once
}

func (f *feed) detach() { f.once.Do(func() { close(f.gone) }) }

// push queues m (by the reader, under its lock); false when the feed,
// or all feeds together, would hold too much (one message always fits
// an empty feed, within the fanout's bound).
func (f *feed) push(m jetstream.Msg) bool {
	n := int64(len(m.Data()))
	fo := f.r.fo
	f.mu.Lock()
	queued := f.q.len()
	ok := (queued == 0 || queued < fo.room && f.bytes+n <= feedBytes) && fo.buffered.Load()+n <= fanoutBytes
	if ok {
		f.q.push(m)
		f.bytes += n
		fo.buffered.Add(n)
	}
	f.mu.Unlock()
	if ok {
		select {
		case f.ready <- struct{}{}:
		default:
		}
	}
	return ok
}

// pop takes the oldest queued message; rest is how many remain.
func (f *feed) pop() (m jetstream.Msg, rest int, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if m, ok = f.q.pop(); !ok {
		return nil, 0, false
	}
	n := int64(len(m.Data()))
	f.bytes -= n
	f.r.fo.buffered.Add(-n)
	return m, f.q.len(), true
}

// queued is how many messages f holds.
func (f *feed) queued() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.q.len()
}

// release drops what a detached feed still holds from the fanout's
// count (a session that ends without reading its feed to the end).
func (f *feed) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.r.fo.buffered.Add(-f.bytes)
	f.q, f.bytes = fifo[jetstream.Msg]{}, 0
}

// fifo is a queue that reuses the room its taken front leaves.
type fifo[T any] struct {
	s    []T // s[head:] are queued
	head int
}

func (q *fifo[T]) len() int { return len(q.s) - q.head }

func (q *fifo[T]) push(v T) {
	if q.head > 0 && len(q.s) == cap(q.s) {
		k := copy(q.s, q.s[q.head:])
		clear(q.s[k:])
		q.s, q.head = q.s[:k], 0
	}
	q.s = append(q.s, v)
}

func (q *fifo[T]) pop() (v T, ok bool) {
	if q.head == len(q.s) {
		return v, false
	}
	var zero T
	v, q.s[q.head] = q.s[q.head], zero
	if q.head++; q.head == len(q.s) {
		q.s, q.head = q.s[:0], 0
	}
	return v, true
}

// unitFilter is the subject filter of a unit's messages in src.
func unitFilter(src source, u Unit) string {
	return bus.DeliveryStreamFilter(bus.UnescapeToken(src.token), u.Sink, u.Basin, u.Stream)
}

// feedPrefix is what a unit's delivery subjects start with (before their
// partition token).
func feedPrefix(src source, u Unit) string { return strings.TrimSuffix(unitFilter(src, u), "*") }

// attach starts feeding the unit's messages after the reader's position,
// which it returns (a reader started now starts at the stream's end).
func (fo *fanout) attach(ctx context.Context, src source, u Unit) (*feed, uint64, error) {
	r, err := fo.reader(ctx, src, 0, true)
	if err != nil {
		return nil, 0, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dead {
		return nil, 0, fmt.Errorf("the reader of %s ended", src.name)
	}
	return fo.add(r, src, u), r.pos, nil
}

// attachRunning attaches the unit to the source's reader if one runs,
// with the unit's messages its history holds (the latest room/2 of them:
// the rest of the feed is for what arrives while the session starts). The
// feed holds every message of the unit after the position it returns: a
// new unit's first message usually (the reader read it while this
// process claimed the unit).
func (fo *fanout) attachRunning(src source, u Unit) (*feed, uint64, bool) {
	fo.mu.Lock()
	r := fo.readers[src.key]
	fo.mu.Unlock()
	if r == nil {
		return nil, 0, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dead {
		return nil, 0, false
	}
	f := fo.add(r, src, u)
	at, recent := r.hist.from-1, r.hist.byPrefix[f.prefix]
	if keep := fo.room / 2; len(recent) > keep {
		at, recent = recent[len(recent)-keep-1].seq, recent[len(recent)-keep:]
	}
	if !f.replay(recent) { // all feeds together hold too much: from here on only
		f.release()
		return f, r.pos, true
	}
	return f, at, true
}

// attachAhead attaches the unit if the reader has not read past from
// (the first sequence the unit wants) yet, or holds every message since
// from in its history (they go into the feed first), starting a reader
// at from if there is none (and from is near the end). Nil: it has read
// past, or there is no reader (0 means the stream's first message: a
// unit without a position finds its first message faster on its own);
// the unit catches up on its own first.
func (fo *fanout) attachAhead(ctx context.Context, src source, u Unit, from uint64) *feed {
	r, err := fo.reader(ctx, src, from, false)
	if err != nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dead || from == 0 || from < r.hist.from {
		return nil
	}
	var recent []*recentMsg
	if r.pos >= from {
		// At most half a feed (room for what arrives next) and what the
		// feeds may hold: checked before add, which detaches the unit's
		// feed attached earlier.
		recent = r.hist.since(feedPrefix(src, u), from)
		var n int64
		for _, rm := range recent {
			n += int64(len(rm.m.Data()))
		}
		if len(recent) > fo.room/2 || n > feedBytes/2 || fo.buffered.Load()+n > fanoutBytes {
			return nil
		}
	}
	f := fo.add(r, src, u)
	if !f.replay(recent) { // more than a feed holds: on its own
		delete(r.feeds, f.prefix)
		f.detach()
		f.release()
		return nil
	}
	return f
}

// replay queues messages from the reader's history (under its lock);
// false when they do not all fit.
func (f *feed) replay(recent []*recentMsg) bool {
	for _, rm := range recent {
		if !f.push(rm.m) {
			return false
		}
	}
	f.r.fo.replayed.Add(int64(len(recent)))
	return true
}

// add registers u's feed in r (under r.mu).
func (fo *fanout) add(r *streamReader, src source, u Unit) *feed {
	prefix := feedPrefix(src, u)
	if old := r.feeds[prefix]; old != nil {
		old.detach()
	}
	f := &feed{r: r, prefix: prefix, ready: make(chan struct{}, 1), gone: make(chan struct{})}
	r.feeds[prefix] = f
	return f
}

// leave detaches f and drops what it holds.
func (f *feed) leave(src source, u Unit) {
	f.r.mu.Lock()
	if p := feedPrefix(src, u); f.r.feeds[p] == f {
		delete(f.r.feeds, p)
	}
	f.detach()
	f.r.mu.Unlock()
	f.release()
}

// backlog is how many messages behind the stream's end the shared
// reader is reading a backlog rather than keeping up.
const backlog = 256

// readerMessages is how many messages a reader's consumer buffers (a
// delivery message is at most the server's max_payload, 1 MB by
// default; fewer, smaller pulls made the tests' busy JetStream time out).
const readerMessages = 4096

// readerBehind is how far behind the stream's end a reader may start
// (messages).
const readerBehind = 200_000

// reader returns the source's reader, started if there is none: at the
// stream's end, or (!atEnd) at from if from is at most readerBehind
// messages before it.
func (fo *fanout) reader(ctx context.Context, src source, from uint64, atEnd bool) (*streamReader, error) {
	fo.mu.Lock()
	defer fo.mu.Unlock()
	if r := fo.readers[src.key]; r != nil {
		return r, nil
	}
	st, err := fo.js.Stream(ctx, src.name)
	if err != nil {
		return nil, fmt.Errorf("delivery stream %s: %w", src.name, err)
	}
	// At from only if that is near the end: a reader far behind would
	// keep every unit attached to it waiting (and a unit without a
	// position finds its first message faster on its own).
	start := st.CachedInfo().State.LastSeq + 1
	if !atEnd && from > 0 && from < start && start-from <= readerBehind {
		start = from
	}
	// No filter: a source's delivery stream holds only its subjects, and
	// the server reads an unfiltered consumer's messages without matching
	// each subject.
	cons, err := fo.js.OrderedConsumer(ctx, src.name, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start,
		InactiveThreshold: bus.OrderedInactive})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", src.name, err)
	}
	// Bounded in messages, not bytes: with a byte budget a message near
	// it waits for the next pull (a million-row transaction took 2m19s
	// instead of 12 s).
	it, err := cons.Messages(jetstream.PullMaxMessages(readerMessages))
	if err != nil {
		bus.DropConsumer(fo.js, src.name, cons)
		return nil, fmt.Errorf("read %s: %w", src.name, err)
	}
	r := &streamReader{fo: fo, src: src, pos: start - 1, feeds: map[string]*feed{}, hist: history{from: start}}
	fo.readers[src.key] = r
	go func() {
		defer bus.DropConsumer(fo.js, src.name, cons)
		stop := context.AfterFunc(fo.ctx, it.Stop)
		defer stop()
		err := r.run(it)
		if fo.ctx.Err() == nil {
			fo.log.Warn("the shared reader of a delivery stream ended; its units read on their own", "stream", src.name, "error", err)
		}
		fo.mu.Lock()
		if fo.readers[src.key] == r {
			delete(fo.readers, src.key)
		}
		fo.mu.Unlock()
		r.mu.Lock()
		r.dead = true
		for _, f := range r.feeds {
			f.detach()
		}
		clear(r.feeds)
		r.hist = history{from: r.hist.from} // its feeds may live on a while: not its history
		r.mu.Unlock()
	}()
	return r, nil
}

// run hands each message to its unit's feed until the iterator fails.
func (r *streamReader) run(it jetstream.MessagesContext) error {
	for {
		m, err := it.Next()
		if err != nil {
			return err
		}
		md, err := m.Metadata()
		if err != nil {
			return err
		}
		subj := m.Subject()
		prefix := subj[:strings.LastIndexByte(subj, '.')+1]
		r.mu.Lock()
		r.pos = md.Sequence.Stream
		r.behind.Store(md.NumPending)
		r.hist.add(prefix, r.pos, m, r.fo.histRoom)
		if f := r.feeds[prefix]; f != nil {
			if !f.push(m) { // too slow: it reads on its own
				delete(r.feeds, prefix)
				f.detach()
				// What it holds goes too (its unit reads it again after the
				// last message it forwarded): a session that starts minutes
				// later must not keep the fanout's bytes until then.
				f.release()
				r.fo.detached.Add(1)
			}
		}
		r.mu.Unlock()
	}
}

// fedMsg is a message from a feed: its metadata's pending count is what
// the unit's feed holds behind it, and one more while the reader is
// reading a backlog (the unit's share of it is unknown, so its batches
// fill as from a consumer of its own: a million-row transaction took
// 16 s instead of 12), not the shared consumer's pending count. Under a
// live load, a few messages behind the reader are other units' more
// likely than this one's: counting them made every unit wait for its
// linger (p50 5 → 11 ms at 1,000 streams).
type fedMsg struct {
	jetstream.Msg
	md jetstream.MsgMetadata
}

func (m *fedMsg) Metadata() (*jetstream.MsgMetadata, error) { return &m.md, nil }

// take wraps m, taken from f with rest behind it, for the worker.
func (f *feed) take(m jetstream.Msg, rest int) (jetstream.Msg, error) {
	md, err := m.Metadata()
	if err != nil {
		return nil, err
	}
	fm := &fedMsg{Msg: m, md: *md}
	fm.md.NumPending = uint64(rest)
	if f.r.behind.Load() > backlog {
		fm.md.NumPending++
	}
	return fm, nil
}
