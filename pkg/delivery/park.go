package delivery

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// ParkedStream holds parked messages: those that cannot be appended as
// they are, and every later message of their group.
const ParkedStream = "PGS2_PARKED"

// ParkRoot is the subject root of parked messages:
// pgs2.parked.<sink>.<basin>.<stream>.<group id>.
const ParkRoot = "pgs2.parked"

// ownerToken is the last subject token of a unit's owner marker,
// pgs2.parked.<sink>.<basin>.<stream>.owner (group ids are hex, never it).
const ownerToken = "owner"

// Headers of a parked message, besides the delivery message's own.
const (
	// HeaderDeliverySeq is a parked message's delivery position
	// (bus.DeliveryPos).
	HeaderDeliverySeq = "Pgs2-Delivery-Seq"
	// HeaderThrough, on every park message and owner marker, is the
	// unit's progress (bus.Progress) when it was published: every change
	// up to it is in S2 or in a park.
	HeaderThrough    = "Pgs2-Through"
	HeaderParkReason = "Pgs2-Park-Reason"
	// HeaderParkKind says why the message is parked: "failed" (it could
	// not be appended as it is) or "behind" (an earlier change of its
	// group is parked).
	HeaderParkKind = "Pgs2-Park-Kind"
	HeaderParkedAt = "Pgs2-Parked-At"
	HeaderSubject  = "Pgs2-Subject"
	HeaderS2Status = "Pgs2-S2-Status"
	HeaderS2Code   = "Pgs2-S2-Code"
	HeaderAttempts = "Pgs2-Attempts"
)

// parkKind is a HeaderParkKind value.
type parkKind string

const (
	parkFailed parkKind = "failed"
	parkBehind parkKind = "behind"
)

// DeadStream holds messages given up after retry.max_attempts, with their
// last error: never silently dropped.
const DeadStream = "PGS2_DEAD"

// DeadSubject is a unit's dead-letter subject.
func DeadSubject(u Unit) string {
	return "pgs2.dead." + bus.EscapeToken(u.Sink) + "." + bus.EscapeToken(u.Basin) + "." + bus.EscapeToken(u.Stream)
}

// groupID names a group of a table of a source (its delivery stream) in
// park subjects: 128 bits of SHA-256 of the stream, the table and the group
// key, so that two groups share a park only with odds of about n²/2¹²⁹ for
// n parked groups (nil for a billion).
func groupID(stream string, table, group []byte) string {
	h := sha256.New()
	h.Write([]byte(stream))
	h.Write([]byte{0})
	h.Write(table)
	h.Write([]byte{0})
	h.Write(group)
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// ParkSubject is the park of one group of a unit.
func ParkSubject(u Unit, group string) string {
	return ParkRoot + "." + bus.EscapeToken(u.Sink) + "." + bus.EscapeToken(u.Basin) + "." + bus.EscapeToken(u.Stream) + "." + group
}

// parseParkSubject splits a park subject into its unit and group id (the
// owner marker is not a park).
func parseParkSubject(subject string) (u Unit, group string, ok bool) {
	t := strings.Split(subject, ".")
	if len(t) != 6 || t[0]+"."+t[1] != ParkRoot || t[5] == ownerToken {
		return Unit{}, "", false
	}
	return Unit{bus.UnescapeToken(t[2]), bus.UnescapeToken(t[3]), bus.UnescapeToken(t[4])}, t[5], true
}

// ParkFilter matches every park of a unit (and its owner marker).
func ParkFilter(u Unit) string { return ParkSubject(u, "*") }

// EnsureParkedStream creates or updates the park stream. Parked messages
// stay until they are delivered or acknowledged by an operator.
func EnsureParkedStream(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.Stream, error) {
	st, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        ParkedStream,
		Description: "pgs2 parked messages: failed and held back in group order",
		Subjects:    []string{ParkRoot + ".>"},
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
		Duplicates:  time.Hour,
		AllowDirect: true,
		AllowRollup: true, // an owner marker replaces the earlier ones
	})
	if err != nil {
		return nil, fmt.Errorf("create or update stream %s: %w", ParkedStream, err)
	}
	_, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: DeadStream, Description: "pgs2 messages given up after retry.max_attempts",
		Subjects: []string{"pgs2.dead.>"}, Storage: jetstream.FileStorage, Replicas: replicas, Duplicates: time.Hour,
	})
	if err != nil {
		return nil, fmt.Errorf("create or update stream %s: %w", DeadStream, err)
	}
	return st, nil
}

// RetrySubject is where the admin API asks a unit's worker to retry its
// parked groups now.
func RetrySubject(u Unit) string {
	return retryRoot + bus.EscapeToken(u.Sink) + "." + bus.EscapeToken(u.Basin) + "." + bus.EscapeToken(u.Stream)
}

const retryRoot = "pgs2.admin.retry."

// retryAll is every unit's RetrySubject: a process subscribes once, not
// once per unit (10,000 units made 10,000 subscriptions and goroutines).
const retryAll = retryRoot + "*.*.*"

// retryUnit is the unit a RetrySubject names.
func retryUnit(subject string) (Unit, bool) {
	t := strings.Split(strings.TrimPrefix(subject, retryRoot), ".")
	if len(t) != 3 || !strings.HasPrefix(subject, retryRoot) {
		return Unit{}, false
	}
	return Unit{bus.UnescapeToken(t[0]), bus.UnescapeToken(t[1]), bus.UnescapeToken(t[2])}, true
}

// unitParks is a worker's view of its unit's parks. Every session starts
// by publishing an owner marker conditional on the last sequence of all
// the unit's park subjects being the one it read (Nats-Expected-Last-
// Subject-Sequence over ParkFilter: no park and no other marker stored
// since), and every later message the worker publishes there is
// conditional on the last sequence of the owner subject being its own
// marker's: once a new owner's marker is stored, an earlier owner's park
// publishes are refused, so a change is never parked behind the back of
// the owner that read the parks. (A condition over ParkFilter on every
// park cost the server a look at each parked group's subject: parking
// took time in proportion to the groups parked.)
type unitParks struct {
	js    jetstream.JetStream
	st    jetstream.Stream
	u     Unit
	token string

	owner uint64 // the sequence of this owner's last marker
	// through is the unit's progress when the last park message or
	// marker was published: every change up to it is in S2 or in a park.
	through bus.Progress
	groups  map[string]*parkedGroup
	// order is the parked groups, for taking turns at draining; a group
	// removed stays in it until it is compacted (a removal is O(1), not
	// a search of 100,000 groups), so nextDue skips those not in groups.
	order   []string
	inOrder map[string]bool // the groups in order
	next    int
}

// parkedGroup is the retry state of one parked group's head.
type parkedGroup struct {
	attempts int
	due      time.Time
}

// newUnitParks: st is the park stream (nil: looked up by each session).
func newUnitParks(js jetstream.JetStream, st jetstream.Stream, u Unit, token string) *unitParks {
	return &unitParks{js: js, st: st, u: u, token: token, groups: map[string]*parkedGroup{},
		inOrder: map[string]bool{}, through: bus.Progress{}}
}

func (p *unitParks) ownerSubject() string { return ParkSubject(p.u, ownerToken) }

// open starts a session: it removes a drained prefix an earlier session
// appended but did not remove (drained: S2's HeaderPark, "" for none),
// stores this owner's marker, and loads which groups are parked.
func (p *unitParks) open(ctx context.Context, drained string) error {
	var err error
	if p.st == nil {
		if p.st, err = p.js.Stream(ctx, ParkedStream); err != nil {
			return fmt.Errorf("park stream %s: %w", ParkedStream, err)
		}
	}
	if drained != "" {
		group, seq, err := parseParkRef(drained)
		if err != nil {
			return err
		}
		if err := p.purge(ctx, group, seq); err != nil {
			return err
		}
	}
	if err := p.claim(ctx); err != nil {
		return err
	}
	return p.load(ctx)
}

// claim publishes the owner marker, conditional on the unit's parks
// being as read, and takes the unit's progress from what preceded it (a
// park message, or the previous marker, which carries it on).
func (p *unitParks) claim(ctx context.Context) error {
	filter := ParkFilter(p.u)
	for attempt := 0; ; attempt++ {
		var lastSeq uint64
		through := bus.Progress{}
		last, err := p.last(ctx, filter)
		if err != nil {
			return err
		}
		if last != nil {
			lastSeq = last.Sequence
			if err := mergeThrough(through, last); err != nil {
				return fmt.Errorf("parked message %d of %s: %w", last.Sequence, p.u, err)
			}
		}
		// The previous marker carries the progress on, in case the park
		// messages after it were removed since.
		prev, err := p.last(ctx, p.ownerSubject())
		if err != nil {
			return err
		}
		if prev != nil {
			if err := mergeThrough(through, prev); err != nil {
				return fmt.Errorf("owner marker %d of %s: %w", prev.Sequence, p.u, err)
			}
		}
		m := &nats.Msg{Subject: p.ownerSubject(), Data: []byte(p.token), Header: nats.Header{}}
		m.Header.Set(HeaderThrough, through.String())
		m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject) // earlier markers are of no use
		ack, err := p.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequenceForSubject(lastSeq, filter))
		if wrongLast(err) && attempt < 10 {
			continue // parked meanwhile (an earlier owner still finishing): read again
		}
		if err != nil {
			return fmt.Errorf("claim the parks of %s: %w", p.u, err)
		}
		p.owner, p.through = ack.Sequence, through
		return nil
	}
}

// mergeThrough advances through to a park message's or marker's
// HeaderThrough. A message parked by pgs2 before delivery streams per
// source has none (its HeaderDeliverySeq has no stream): it adds nothing.
func mergeThrough(through bus.Progress, m *jetstream.RawStreamMsg) error {
	v := m.Header.Get(HeaderThrough)
	if v == "" {
		return nil
	}
	q, err := bus.ParseProgress(v)
	if err != nil {
		return err
	}
	through.Merge(q)
	return nil
}

// load learns which groups of the unit are parked.
func (p *unitParks) load(ctx context.Context) error {
	clear(p.groups)
	clear(p.inOrder)
	p.order, p.next = p.order[:0], 0
	info, err := p.st.Info(ctx, jetstream.WithSubjectFilter(ParkFilter(p.u)))
	if err != nil {
		return fmt.Errorf("list parked groups of %s: %w", p.u, err)
	}
	now := time.Now()
	for subj, n := range info.State.Subjects {
		if _, group, ok := parseParkSubject(subj); ok && n > 0 {
			p.groups[group] = &parkedGroup{due: now}
			p.order = append(p.order, group)
			p.inOrder[group] = true
		}
	}
	return nil
}

func wrongLast(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// publish parks a message of group, conditional on this owner's marker
// being the last one. When it is not, the unit is no longer this one's,
// unless the last marker is this process's own (a publish of it whose
// answer was lost): then it retries after it.
func (p *unitParks) publish(ctx context.Context, group string, h nats.Header, body []byte) error {
	m := &nats.Msg{Subject: ParkSubject(p.u, group), Header: h, Data: body}
	for attempt := 0; ; attempt++ {
		_, err := p.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequenceForSubject(p.owner, p.ownerSubject()))
		if err == nil {
			return nil
		}
		if !wrongLast(err) || attempt >= 10 {
			return err
		}
		if err := p.checkOwner(ctx); err != nil {
			return err
		}
	}
}

// last returns the last message on subject (a filter) of the park stream,
// or nil when there is none: the leader's (a replica behind it has an
// older owner marker or none).
func (p *unitParks) last(ctx context.Context, subject string) (*jetstream.RawStreamMsg, error) {
	m, err := bus.LeaderMsg(ctx, p.js, ParkedStream, 0, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("last message of %s: %w", subject, err)
	}
	return m, nil
}

// checkOwner fails with ErrLeaseLost unless the unit's last owner marker
// is this process's, whose sequence it takes.
func (p *unitParks) checkOwner(ctx context.Context) error {
	owner, err := p.last(ctx, p.ownerSubject())
	if err != nil {
		return err
	}
	if owner == nil || string(owner.Data) != p.token {
		return fmt.Errorf("%w: another process claimed the parks of %s", ErrLeaseLost, p.u)
	}
	p.owner = owner.Sequence
	return nil
}

// settle records, before changes leave delivery without reaching S2 (a
// park's head dead-lettered or filtered out, a batch dead-lettered), that
// every change up to through is handled: S2 holds no trace of them, so
// without it the next session would read them again. It publishes a new
// owner marker carrying through, conditional, so it fails with
// ErrLeaseLost once another process claimed the unit.
//
// Unlike a park it takes the claim's condition, over all the unit's park
// subjects (a read of every parked group's subject, but settling is
// rare): on a cluster the leader holds back a conditional publish only
// while another with the same condition subject is in flight, and a new
// owner's claim in flight together with this marker would otherwise both
// be stored, the claim's rollup removing this marker and the progress it
// carries (the settled changes would be delivered again).
func (p *unitParks) settle(ctx context.Context, read bus.Progress) error {
	through := p.through.Clone()
	through.Merge(read)
	filter := ParkFilter(p.u)
	m := &nats.Msg{Subject: p.ownerSubject(), Header: nats.Header{}, Data: []byte(p.token)}
	m.Header.Set(HeaderThrough, through.String())
	for attempt := 0; ; attempt++ {
		// The last sequence, then the owner (in that order: a marker
		// stored after the first read makes the publish fail).
		last, err := p.last(ctx, filter)
		if err != nil {
			return err
		}
		if err := p.checkOwner(ctx); err != nil {
			return err
		}
		var lastSeq uint64
		if last != nil {
			lastSeq = last.Sequence
		}
		ack, err := p.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequenceForSubject(lastSeq, filter))
		if err == nil {
			p.owner = ack.Sequence
			break
		}
		if !wrongLast(err) || attempt >= 10 {
			return fmt.Errorf("record the progress of %s: %w", p.u, err)
		}
	}
	p.through = through
	if err := p.st.Purge(ctx, jetstream.WithPurgeSubject(p.ownerSubject()), jetstream.WithPurgeKeep(1)); err != nil {
		return fmt.Errorf("remove old owner markers of %s: %w", p.u, err)
	}
	return nil
}

// purge removes a group's parked messages up to seq (delivered, dropped
// or dead-lettered).
func (p *unitParks) purge(ctx context.Context, group string, seq uint64) error {
	if err := p.st.Purge(ctx, jetstream.WithPurgeSubject(ParkSubject(p.u, group)), jetstream.WithPurgeSequence(seq+1)); err != nil {
		return fmt.Errorf("remove delivered messages of park %s of %s: %w", group, p.u, err)
	}
	return nil
}

// parkRef names a drained prefix of a park (HeaderPark): "<group>:<seq>".
func parkRef(group string, seq uint64) string { return group + ":" + strconv.FormatUint(seq, 10) }

func parseParkRef(s string) (group string, seq uint64, err error) {
	group, v, ok := strings.Cut(s, ":")
	if ok {
		seq, err = strconv.ParseUint(v, 10, 64)
	}
	if !ok || err != nil || group == "" {
		return "", 0, fmt.Errorf("S2 record header %s %q is not <group>:<seq>", "pgs2-park", s)
	}
	return group, seq, nil
}

func (p *unitParks) has(group string) bool { return p.groups[group] != nil }

func (p *unitParks) count() int { return len(p.groups) }

// add records that group has a message parked, published with the
// unit's progress through; a newly parked group's head is first retried
// after first.
func (p *unitParks) add(group string, through bus.Progress, first time.Duration) {
	if p.groups[group] == nil {
		p.groups[group] = &parkedGroup{due: time.Now().Add(first)}
		if !p.inOrder[group] { // not still there since its removal
			p.order = append(p.order, group)
			p.inOrder[group] = true
		}
	}
	p.through = through
}

// remove forgets a group whose park is empty.
func (p *unitParks) remove(group string) {
	delete(p.groups, group)
	if len(p.order) < 64 || len(p.order) < 2*len(p.groups) {
		return
	}
	// Compact: keep the groups parked, in their turn order.
	kept := p.order[:0]
	next := 0
	for i, g := range p.order {
		if i == p.next {
			next = len(kept)
		}
		if p.groups[g] != nil {
			kept = append(kept, g)
		} else {
			delete(p.inOrder, g)
		}
	}
	if p.next >= len(p.order) {
		next = len(kept)
	}
	clear(p.order[len(kept):])
	p.order, p.next = kept, next
}

// dueNow makes every parked group's head due (an operator asked).
func (p *unitParks) dueNow() {
	for _, g := range p.groups {
		g.due = time.Time{}
	}
}

// nextDue returns the next parked group, in turn, whose retry is due.
func (p *unitParks) nextDue(now time.Time) (string, *parkedGroup) {
	for k := 0; k < len(p.order); k++ {
		i := (p.next + k) % len(p.order)
		g := p.order[i]
		if st := p.groups[g]; st != nil && !now.Before(st.due) {
			p.next = i + 1
			return g, st
		}
	}
	return "", nil
}
