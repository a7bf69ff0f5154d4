package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/change"
)

// ChangesStreamConfig describes a source's changes stream.
type ChangesStreamConfig struct {
	Name            string
	Source          string
	Replicas        int
	DuplicateWindow time.Duration
	MaxAge          time.Duration // 0 = keep until deleted
}

// ErrStreamShared means a changes or delivery stream holds another
// writer's subjects.
var ErrStreamShared = errors.New("stream is shared")

// EnsureChangesStream creates or updates the changes stream. Capture must be
// its only writer: ordered publishing uses Nats-Expected-Last-Sequence, which
// JetStream checks per stream.
func EnsureChangesStream(ctx context.Context, js jetstream.JetStream, c ChangesStreamConfig) (jetstream.Stream, error) {
	subjects := []string{ChangesFilter(c.Source)}
	sc := jetstream.StreamConfig{
		Name:        c.Name,
		Description: "pgs2 changes of source " + c.Source,
		Subjects:    subjects,
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    c.Replicas,
		Duplicates:  c.DuplicateWindow,
		MaxAge:      c.MaxAge,
		Discard:     jetstream.DiscardOld,
		AllowDirect: true,
		MaxMsgSize:  -1,
	}
	return ensureOwnStream(ctx, js, sc, func(have []string) error {
		return fmt.Errorf("%w: stream %s has subjects %v, not %v; each source needs a stream of its own: "+
			"set nats.changes_stream to another name", ErrStreamShared, c.Name, have, subjects)
	})
}

// ensureOwnStream creates the stream sc describes, or updates it when it
// exists with exactly sc's subjects. A stream with other subjects is
// another writer's: shared(its subjects) is the error.
func ensureOwnStream(ctx context.Context, js jetstream.JetStream, sc jetstream.StreamConfig, shared func(have []string) error) (jetstream.Stream, error) {
	s, err := js.Stream(ctx, sc.Name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		s, err = js.CreateStream(ctx, sc)
		if err != nil {
			return nil, fmt.Errorf("create stream %s: %w", sc.Name, err)
		}
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("look up stream %s: %w", sc.Name, err)
	}
	if have := s.CachedInfo().Config.Subjects; !slices.Equal(have, sc.Subjects) {
		return nil, shared(have)
	}
	s, err = js.UpdateStream(ctx, sc)
	if err != nil {
		return nil, fmt.Errorf("update stream %s: %w", sc.Name, err)
	}
	return s, nil
}

// Headers of a changes-stream message: capture publishes rounds (see
// Round) and names each message's round by its first and last change.
const (
	HeaderRoundFirst = "Pgs2-Round-First" // key of the round's first change
	HeaderRoundLast  = "Pgs2-Round-Last"  // key of the round's last change
)

// ChangesResume is what the changes stream holds of a source: where
// capture resumes.
type ChangesResume struct {
	// LastSeq is the stream's last sequence: the publisher's chain
	// continues from it.
	LastSeq uint64
	// LastID is the last message's Pgs2-Msg-Id ("" when there is none).
	LastID string
	// Through: every change up to it is stored (the end of the last
	// complete round).
	Through change.Position
	// Partial is set when the last round was cut short (a crash while
	// publishing it), or completes one that was: of its changes, First to
	// Last, those in Stored (keys) are in the stream, the others are not.
	Partial     bool
	First, Last change.Position
	Stored      map[string]bool
}

// Skip reports whether the change at pos (with idempotency key key) is in
// the stream already.
func (r *ChangesResume) Skip(pos change.Position, key []byte) bool {
	if !r.Partial {
		return !r.Through.Less(pos)
	}
	if pos.Less(r.First) {
		return true
	}
	if r.Last.Less(pos) {
		r.Partial, r.Stored, r.Through = false, nil, r.Last // past the interrupted round
		return false
	}
	return r.Stored[string(key)]
}

// ResumeChanges reads what the changes stream holds of the source: its
// last message and, when that ends an interrupted round, the keys the
// round's stored messages carry. Capture is the stream's only writer, so a
// round's messages are the stream's last ones.
//
// Every read goes to the stream's leader (its state, and LeaderMsg): the
// last message must be the one at the LastSeq the chain goes on from.
func ResumeChanges(ctx context.Context, js jetstream.JetStream, stream, source string) (ChangesResume, error) {
	filter := ChangesFilter(source)
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return ChangesResume{}, fmt.Errorf("read the state of the changes stream: %w", err)
	}
	info := s.CachedInfo()
	last := info.State.LastSeq
	if info.State.Msgs == 0 {
		return ChangesResume{LastSeq: last}, nil
	}
	// The chain goes on from LastSeq; the headers come from the last
	// message still stored (an operator may have deleted the very last).
	m, err := LeaderMsg(ctx, js, stream, 0, filter)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return ChangesResume{LastSeq: last}, nil
	}
	if err != nil {
		return ChangesResume{}, fmt.Errorf("read the last message of %s: %w", filter, err)
	}
	r := ChangesResume{LastSeq: last, LastID: m.Header.Get(HeaderID)}
	i, n, err := ParseRound(m.Header.Get(HeaderRound))
	if err == nil {
		r.First, err = change.ParseKey(m.Header.Get(HeaderRoundFirst))
	}
	if err == nil {
		r.Last, err = change.ParseKey(m.Header.Get(HeaderRoundLast))
	}
	if err != nil || r.LastID == "" {
		return ChangesResume{}, fmt.Errorf("message %d on %s lacks a valid %s, %s, %s or %s (written by another version of capture?): %v",
			m.Sequence, filter, HeaderID, HeaderRound, HeaderRoundFirst, HeaderRoundLast, err)
	}
	first := m.Header.Get(HeaderRoundFirst)
	if i == n {
		// A complete round, unless it is one of the rounds that complete
		// an interrupted one: they carry its Round-First (and a Round-Last
		// at least as late) until one gets past its last change, so the
		// message before this round's first tells.
		prev := m.Sequence - uint64(n)
		if prev == 0 {
			r.Through = r.Last
			return r, nil
		}
		pm, err := LeaderMsg(ctx, js, stream, prev, "")
		if errors.Is(err, jetstream.ErrMsgNotFound) || err == nil && pm.Header.Get(HeaderRoundFirst) != first {
			r.Through = r.Last
			return r, nil
		}
		if err != nil {
			return ChangesResume{}, fmt.Errorf("read message %d, before the last round: %w", prev, err)
		}
	}
	// The interrupted round's stored messages are the stream's last ones,
	// with the rounds published to complete it: every message back from
	// the last with its Round-First. The stored changes between First and
	// the latest Round-Last of them are their keys.
	r.Partial, r.Stored = true, map[string]bool{}
	for seq := m.Sequence; seq > 0; seq-- {
		sm, err := LeaderMsg(ctx, js, stream, seq, "")
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return ChangesResume{}, fmt.Errorf("read message %d of the interrupted round: %w", seq, err)
		}
		if sm.Header.Get(HeaderRoundFirst) != first {
			if seq > m.Sequence-uint64(i) {
				return ChangesResume{}, fmt.Errorf("message %d is not of the interrupted round ending at %d: does another writer publish to %s?", seq, m.Sequence, filter)
			}
			break
		}
		if last, err := change.ParseKey(sm.Header.Get(HeaderRoundLast)); err == nil && r.Last.Less(last) {
			r.Last = last
		}
		br := NewBatchReader(sm.Data)
		var e Entry
		for br.Next(&e) {
			r.Stored[string(e.Key)] = true
		}
		if err := br.Err(); err != nil {
			return ChangesResume{}, fmt.Errorf("message %d: %w", seq, err)
		}
	}
	return r, nil
}

// ParseRound reads a HeaderRound value, "<i>/<n>".
func ParseRound(v string) (i, n int, err error) {
	is, ns, _ := strings.Cut(v, "/")
	i, err = strconv.Atoi(is)
	if err == nil {
		n, err = strconv.Atoi(ns)
	}
	if err != nil || i < 1 || i > n {
		return 0, 0, fmt.Errorf("round %q is not <i>/<n>", v)
	}
	return i, n, nil
}
