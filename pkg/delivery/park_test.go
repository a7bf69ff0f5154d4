package delivery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// TestStaleOwnerCannotPark: once a new owner claimed a unit's parks, the
// old owner's park publish is refused (ErrLeaseLost) instead of landing
// behind the new owner's back. On d7607e1 a park was a plain publish.
func TestStaleOwnerCannotPark(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	u := Unit{"s", testBasin, "stale"}
	old, cur := newUnitParks(h.js, nil, u, "old"), newUnitParks(h.js, nil, u, "new")
	if err := old.open(ctx, ""); err != nil {
		t.Fatal(err)
	}
	g := groupID(testStream, []byte("public.t"), []byte(`["1"]`))
	park := func(p *unitParks, pos int) error {
		hd := nats.Header{}
		at := bus.DeliveryPos{Stream: h.src.key, Seq: uint64(pos)}
		hd.Set(HeaderDeliverySeq, at.String())
		hd.Set(HeaderThrough, bus.Progress{at.Stream: at}.String())
		return p.publish(ctx, g, hd, []byte("{}"))
	}
	if err := park(old, 1); err != nil {
		t.Fatalf("the owner parks: %v", err)
	}
	if err := cur.open(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if want := (bus.Progress{h.src.key: {Stream: h.src.key, Seq: 1}}); !cur.has(g) || !cur.through.Equal(want) {
		t.Fatalf("the new owner sees groups %v through %v, want the park of 1.0", cur.groups, cur.through)
	}
	if err := park(old, 2); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("the old owner's park after the claim: %v, want ErrLeaseLost", err)
	}
	if err := park(cur, 2); err != nil {
		t.Fatalf("the new owner parks: %v", err)
	}
}

// TestGroupIDsDoNotCollide: two groups whose 30-bit hashes (d7607e1's
// park subjects) collide get distinct parks, and the table is part of a
// group's identity.
func TestGroupIDsDoNotCollide(t *testing.T) {
	seen := map[int]string{}
	var a, b string
	for i := 0; a == ""; i++ {
		g := fmt.Sprintf(`["%d"]`, i)
		old := bus.Partition([]byte(g), 1<<30)
		if prev, ok := seen[old]; ok {
			a, b = prev, g
		}
		seen[old] = g
	}
	if groupID("S", []byte("public.t"), []byte(a)) == groupID("S", []byte("public.t"), []byte(b)) {
		t.Fatalf("groups %s and %s share a park", a, b)
	}
	if groupID("S", []byte("public.a"), []byte(a)) == groupID("S", []byte("public.b"), []byte(a)) {
		t.Fatalf("group %s of two tables shares a park", a)
	}
	if groupID("S", []byte("public.t"), []byte(a)) == groupID("T", []byte("public.t"), []byte(a)) {
		t.Fatalf("group %s of two sources shares a park", a)
	}
}

// TestEarlierParksAreNamed: a message parked by a pgs2 before delivery
// streams per source (its position has no stream) stops the unit's drain
// with an error that says where it comes from and what to do, not a bare
// parse error.
func TestEarlierParksAreNamed(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	u := Unit{"s", testBasin, "legacy"}
	g := "12345678"
	m := &nats.Msg{Subject: ParkSubject(u, g), Header: nats.Header{}, Data: []byte("{}")}
	m.Header.Set(HeaderDeliverySeq, "41.0") // the earlier format: <seq>.<index>
	if _, err := h.js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	p := newUnitParks(h.js, nil, u, "w")
	if err := p.open(ctx, ""); err != nil {
		t.Fatal(err)
	}
	_, err := p.head(ctx, g, 10, 1<<20)
	if err == nil || !strings.Contains(err.Error(), "earlier pgs2") || !strings.Contains(err.Error(), "pgs2ctl messages ack") {
		t.Fatalf("head of an earlier park: %v, want an error naming the earlier pgs2 and the fix", err)
	}
}

// TestParkTurns: parked groups take turns at draining while groups are
// parked and unparked in a seeded order (removals are lazy, the turn
// order compacted now and then): a turn goes only to a group parked and
// due, and every due group gets one within as many turns as groups.
func TestParkTurns(t *testing.T) {
	n, seed0 := seeds("PGS2_PARK_TURNS", 20)
	for s := seed0; s < seed0+uint64(n); s++ {
		rng := rand.New(rand.NewPCG(s, 1))
		p := newUnitParks(nil, nil, Unit{"s", testBasin, "turns"}, "t")
		now := time.Now()
		for step := 0; step < 3000; step++ {
			switch r := rng.IntN(10); {
			case r < 4:
				p.add(fmt.Sprintf("g%d", rng.IntN(500)), bus.Progress{}, 0)
			case r < 7 && p.count() > 0:
				// Removing a group (and compacting) does not change whose
				// turn is next among the others.
				g := p.order[rng.IntN(len(p.order))]
				want := ""
				for k := range len(p.order) {
					if c := p.order[(p.next+k)%len(p.order)]; c != g && p.groups[c] != nil {
						want = c
						break
					}
				}
				p.remove(g)
				if got, _ := p.nextDue(now.Add(time.Second)); got != want {
					t.Fatalf("seed %d step %d: after removing %s the turn went to %q, want %q", s, step, g, got, want)
				}
			default:
				served := map[string]bool{}
				for range p.count() {
					g, st := p.nextDue(now.Add(time.Second))
					if st == nil || p.groups[g] != st {
						t.Fatalf("seed %d step %d: turn to %q (%v), not a parked group", s, step, g, st)
					}
					served[g] = true
				}
				for g := range p.groups {
					if !served[g] {
						t.Fatalf("seed %d step %d: %s had no turn in %d turns (replay: PGS2_SEED=%d PGS2_PARK_TURNS=1)", s, step, g, p.count(), s)
					}
				}
			}
			if len(p.order) > 2*p.count()+64 {
				t.Fatalf("seed %d step %d: %d groups in the turn order for %d parked", s, step, len(p.order), p.count())
			}
		}
	}
}

// conditionJS records the condition subject of each owner marker
// published through it.
type conditionJS struct {
	jetstream.JetStream
	mu    sync.Mutex
	conds []string
}

func (c *conditionJS) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	ack, err := c.JetStream.PublishMsg(ctx, m, opts...) // sets the condition's headers on m
	if strings.HasSuffix(m.Subject, "."+ownerToken) {
		c.mu.Lock()
		c.conds = append(c.conds, m.Header.Get(jetstream.ExpectedLastSubjSeqSubjHeader))
		c.mu.Unlock()
	}
	return ack, err
}

// TestSettleTakesTheClaimsCondition: a marker that settles progress is
// conditional on the same subject filter as a new owner's claim. On a
// cluster the leader holds back a conditional publish only while one with
// the same condition subject is in flight: with the owner subject's
// condition (a park's), a stale owner's settle and a new owner's claim
// in flight together were both stored, and the claim's rollup removed the
// settled progress. The stale owner's settle after the claim is refused.
func TestSettleTakesTheClaimsCondition(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	u := Unit{"s", testBasin, "settle"}
	js := &conditionJS{JetStream: h.js}
	old := newUnitParks(js, nil, u, "old")
	if err := old.open(ctx, ""); err != nil {
		t.Fatal(err)
	}
	at := bus.DeliveryPos{Stream: h.src.key, Seq: 7}
	if err := old.settle(ctx, bus.Progress{at.Stream: at}); err != nil {
		t.Fatal(err)
	}
	if want := ParkFilter(u); len(js.conds) != 2 || js.conds[0] != want || js.conds[1] != want {
		t.Fatalf("claim and settle conditional on %q, want both on %q", js.conds, want)
	}
	cur := newUnitParks(h.js, nil, u, "new")
	if err := cur.open(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if want := (bus.Progress{at.Stream: at}); !cur.through.Equal(want) {
		t.Fatalf("the new owner resumes through %v, want the settled %v", cur.through, want)
	}
	if err := old.settle(ctx, bus.Progress{at.Stream: bus.DeliveryPos{Stream: at.Stream, Seq: 9}}); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("the old owner's settle after the claim: %v, want ErrLeaseLost", err)
	}
}

// TestParksReadFromTheLeader: what a worker reads of its parks (the
// claim's last messages, the owner, a park's head) comes from the
// stream's leader, never a direct get, which any replica answers: on a
// cluster one behind the leader said a group's park was empty right
// after a park, the group was unparked, and its later changes overtook
// the parked one (found in review).
func TestParksReadFromTheLeader(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	var direct atomic.Int64
	for _, subj := range []string{"$JS.API.DIRECT.GET." + ParkedStream, "$JS.API.DIRECT.GET." + ParkedStream + ".>"} {
		sub, err := h.nc.Subscribe(subj, func(*nats.Msg) { direct.Add(1) })
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
	}
	if err := h.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	u := Unit{"s", testBasin, "leader"}
	p := newUnitParks(h.js, nil, u, "w")
	if err := p.open(ctx, ""); err != nil {
		t.Fatal(err)
	}
	g := groupID(testStream, []byte("public.t"), []byte(`["1"]`))
	at := bus.DeliveryPos{Stream: h.src.key, Seq: 3}
	hd := nats.Header{}
	hd.Set(HeaderDeliverySeq, at.String())
	hd.Set(HeaderThrough, bus.Progress{at.Stream: at}.String())
	if err := p.publish(ctx, g, hd, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	msgs, err := p.head(ctx, g, 10, 1<<20)
	if err != nil || len(msgs) != 1 {
		t.Fatalf("head of the park: %d messages (%v), want 1", len(msgs), err)
	}
	if err := p.settle(ctx, bus.Progress{at.Stream: at}); err != nil {
		t.Fatal(err)
	}
	if err := p.checkOwner(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := direct.Load(); n > 0 {
		t.Fatalf("%d direct gets of the park stream: any replica answers those", n)
	}
}

// TestRetryUnit: a process's one subscription to retry requests finds
// the unit each names, whatever its names hold.
func TestRetryUnit(t *testing.T) {
	for _, u := range []Unit{{"s", "my-basin", "a"}, {"s.1", "b", "x.y z"}, {"%", "b*", ">"}} {
		got, ok := retryUnit(RetrySubject(u))
		if !ok || got != u {
			t.Errorf("retryUnit(RetrySubject(%v)) = %v, %v", u, got, ok)
		}
	}
	for _, bad := range []string{"pgs2.admin.retry.a.b", "pgs2.admin.other.a.b.c", "pgs2.admin.retry.a.b.c.d"} {
		if u, ok := retryUnit(bad); ok {
			t.Errorf("retryUnit(%q) = %v", bad, u)
		}
	}
}
