package delivery

import (
	"context"
	"fmt"
	"log/slog"
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

// feedMessages and feedBytes bound a feed.
const (
	feedMessages = 1024
	feedBytes    = 16 << 20
)

// fanout is a process's readers, one per source's delivery stream.
type fanout struct {
	js  jetstream.JetStream
	ctx context.Context // the readers' lifetime
	log *slog.Logger
	// room is how many messages a feed holds (feedMessages; tests make
	// it small, so feeds detach and attach again).
	room int
	// detached counts feeds detached for falling behind.
	detached atomic.Int64

	mu      sync.Mutex
	readers map[string]*streamReader // by source key
}

func newFanout(ctx context.Context, js jetstream.JetStream, log *slog.Logger) *fanout {
	return &fanout{js: js, ctx: ctx, log: log, room: feedMessages, readers: map[string]*streamReader{}}
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
}

// feed is one attached unit's messages, in order.
type feed struct {
	r     *streamReader
	ch    chan jetstream.Msg
	bytes atomic.Int64
	gone  chan struct{} // closed once detached: nothing more is sent
	once  sync.Once
}

func (f *feed) detach() { f.once.Do(func() { close(f.gone) }) }

// feedPrefix is what a unit's delivery subjects start with (before their
// partition token).
func feedPrefix(src source, u Unit) string {
	p := bus.DeliveryStreamFilter(bus.UnescapeToken(src.token), u.Sink, u.Basin, u.Stream)
	return strings.TrimSuffix(p, "*")
}

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

// attachAhead attaches the unit if the reader has not read past from
// (the first sequence the unit wants) yet, starting one at from if there
// is none (and from is near the end). Nil: it has, or there is no reader
// (0 means the stream's first message: a unit without a position finds
// its first message faster on its own); the unit catches up on its own
// first.
func (fo *fanout) attachAhead(ctx context.Context, src source, u Unit, from uint64) *feed {
	r, err := fo.reader(ctx, src, from, false)
	if err != nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dead || from == 0 || r.pos >= from {
		return nil
	}
	return fo.add(r, src, u)
}

// add registers u's feed in r (under r.mu).
func (fo *fanout) add(r *streamReader, src source, u Unit) *feed {
	prefix := feedPrefix(src, u)
	if old := r.feeds[prefix]; old != nil {
		old.detach()
	}
	f := &feed{r: r, ch: make(chan jetstream.Msg, fo.room), gone: make(chan struct{})}
	r.feeds[prefix] = f
	return f
}

// leave detaches f.
func (f *feed) leave(src source, u Unit) {
	f.r.mu.Lock()
	defer f.r.mu.Unlock()
	if p := feedPrefix(src, u); f.r.feeds[p] == f {
		delete(f.r.feeds, p)
	}
	f.detach()
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
	r := &streamReader{fo: fo, src: src, pos: start - 1, feeds: map[string]*feed{}}
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
		if f := r.feeds[prefix]; f != nil {
			n := int64(len(m.Data()))
			sent := false
			if f.bytes.Load()+n <= feedBytes || len(f.ch) == 0 {
				select {
				case f.ch <- m:
					f.bytes.Add(n)
					sent = true
				default:
				}
			}
			if !sent { // too slow: it reads on its own
				delete(r.feeds, prefix)
				f.detach()
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

// take wraps m, taken from f, for the worker.
func (f *feed) take(m jetstream.Msg) (jetstream.Msg, error) {
	f.bytes.Add(-int64(len(m.Data())))
	md, err := m.Metadata()
	if err != nil {
		return nil, err
	}
	fm := &fedMsg{Msg: m, md: *md}
	fm.md.NumPending = uint64(len(f.ch))
	if f.r.behind.Load() > backlog {
		fm.md.NumPending++
	}
	return fm, nil
}
