package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
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

// ErrStreamShared means the changes stream holds another writer's subjects.
var ErrStreamShared = errors.New("changes stream is shared")

// EnsureChangesStream creates or updates the changes stream. Capture must be
// its only writer: ordered publishing uses Nats-Expected-Last-Msg-Id, which
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
	s, err := js.Stream(ctx, c.Name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		s, err = js.CreateStream(ctx, sc)
		if err != nil {
			return nil, fmt.Errorf("create stream %s: %w", c.Name, err)
		}
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("look up stream %s: %w", c.Name, err)
	}
	if have := s.CachedInfo().Config.Subjects; !slices.Equal(have, subjects) {
		return nil, fmt.Errorf("%w: stream %s has subjects %v, not %v; each source needs a stream of its own: "+
			"set nats.changes_stream to another name", ErrStreamShared, c.Name, have, subjects)
	}
	s, err = js.UpdateStream(ctx, sc)
	if err != nil {
		return nil, fmt.Errorf("update stream %s: %w", c.Name, err)
	}
	return s, nil
}

// LastChange returns the position and idempotency key of the last change the
// stream holds for the source, or a zero position when it holds none. The
// stream is a gapless prefix of the source's changes (see Publisher), so
// everything up to this position is stored.
func LastChange(ctx context.Context, s jetstream.Stream, source string) (change.Position, string, error) {
	key, err := LastMsgID(ctx, s, ChangesFilter(source))
	if err != nil || key == "" {
		return change.Position{}, "", err
	}
	pos, err := change.ParseKey(key)
	if err != nil {
		return change.Position{}, "", fmt.Errorf("last change of %s: %w", source, err)
	}
	return pos, key, nil
}

// LastMsgID returns the Nats-Msg-Id of the last message on subjects
// matching filter, or "" when there is none.
func LastMsgID(ctx context.Context, s jetstream.Stream, filter string) (string, error) {
	m, err := s.GetLastMsgForSubject(ctx, filter)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read the last message of %s: %w", filter, err)
	}
	id := m.Header.Get(HeaderMsgID)
	if id == "" {
		return "", fmt.Errorf("message %d on %s has no %s", m.Sequence, filter, HeaderMsgID)
	}
	return id, nil
}
