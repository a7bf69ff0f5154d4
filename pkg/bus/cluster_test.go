package bus_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/natstest"
)

// TestChainRidesThroughLeaderLoss publishes a numbered sequence through
// bus.Publisher to a changes stream replicated on three nats-server
// processes while the stream's leader is SIGKILLed twice (and started
// again), rebuilding the publisher from the stream's last message after
// every failure as capture does. The stream must end up holding every
// number exactly once, in order, on current replicas.
func TestChainRidesThroughLeaderLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node nats-server cluster and kills its leaders")
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("PGS2_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("PGS2_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (rerun with PGS2_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))

	const (
		N          = 3000
		stream     = "PGS2_CHANGES"
		window     = 256
		ackTimeout = 2 * time.Second
	)
	started := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()

	c := natstest.NewCluster(t, 3)
	c.WaitReady(t)
	t.Logf("cluster ready after %s", time.Since(started).Round(time.Millisecond))
	nc, js := c.Connect(t)

	var s jetstream.Stream
	retry(t, ctx, "create the stream", func(ctx context.Context) (err error) {
		s, err = bus.EnsureChangesStream(ctx, js, bus.ChangesStreamConfig{
			Name: stream, Source: "app", Replicas: 3, DuplicateWindow: time.Minute})
		return err
	})
	waitWhole(t, ctx, s, 0)

	// The crash schedule, by acknowledged counts drawn from the seed: kill
	// the stream's leader once at more messages are acknowledged (since the
	// start, then since the previous restart), start it again once a
	// message published after the kill is acknowledged and restart more
	// are. The second kill waits until the restarted node caught up.
	type crash struct {
		at, restart int // acknowledged counts
		node        int
		killedAt    time.Time
		publishedAt int // messages published when killed
		pause       time.Duration
		resumedAck  int
	}
	crashes := []*crash{
		{at: 300 + rng.IntN(400), restart: 100 + rng.IntN(200)},
		{at: 300 + rng.IntN(400), restart: 100 + rng.IntN(200)}, // after the first restart
	}
	t.Logf("schedule: kill the leader at %d acked, restart it %d acked after the producer resumed; kill again %d acked after that restart, restart %d after resuming",
		crashes[0].at, crashes[0].restart, crashes[1].at, crashes[1].restart)
	cur := 0          // the crash in progress or next
	killed := false   // crashes[cur]'s node is down
	restartedAck := 0 // acknowledged count at the last restart
	var restartedAt time.Time
	var failures []string
	rebuildErrs := map[string]int{}

	subject := func(i int) string { return "pgs2.changes.app.public.t." + strconv.Itoa(i%4) }
	newPub := func(lastSeq uint64, next int) *bus.Publisher {
		p, err := bus.NewPublisher(nc, lastSeq, uint64(next), bus.PublisherOptions{Window: window, AckTimeout: ackTimeout})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// rebuild reads where the stream ends, as capture's resume does,
	// retrying through elections until the test's deadline.
	rebuild := func() (uint64, int) {
		backoff := 20 * time.Millisecond
		for {
			last, next, err := streamEnd(ctx, s)
			if err == nil {
				return last, next
			}
			rebuildErrs[digits.ReplaceAllString(err.Error(), "#")]++
			if ctx.Err() != nil {
				t.Fatalf("could not read the stream's end before the deadline: %v", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 100*time.Millisecond)
		}
	}

	pub := newPub(0, 0)
	pubStart := 0 // the acknowledged count pub started at
	next := 0     // the next index to publish
	sessions := 1
	for {
		if ctx.Err() != nil {
			t.Fatalf("not done before the deadline: %d published, %d acknowledged, crash %d", next, pub.Acked(), cur)
		}
		select {
		case <-pub.Failed():
			when := "no kill yet"
			if cur < len(crashes) && killed {
				when = fmt.Sprintf("%s after kill %d", time.Since(crashes[cur].killedAt).Round(time.Millisecond), cur+1)
			} else if cur > 0 {
				when = fmt.Sprintf("%s after restart %d", time.Since(restartedAt).Round(time.Millisecond), cur)
			}
			failures = append(failures, fmt.Sprintf("[%s, %d published, %d acked] %v", when, next, pub.Acked(), pub.Err()))
			cctx, ccancel := context.WithTimeout(ctx, time.Second)
			_ = pub.Close(cctx) // failed: returns at once
			ccancel()
			var last uint64
			last, next = rebuild()
			pub, pubStart = newPub(last, next), next
			sessions++
			continue
		default:
		}
		acked := int(pub.Acked())

		// The crash schedule.
		if cur < len(crashes) {
			k := crashes[cur]
			switch {
			case !killed && acked >= restartedAck+k.at:
				if cur > 0 {
					waitWhole(t, ctx, s, 0) // the restarted node caught up
				}
				lctx, lcancel := context.WithTimeout(ctx, time.Second)
				leader, err := c.StreamLeader(lctx, js, stream)
				lcancel()
				if err != nil {
					t.Logf("stream leader at %d acked: %v (retrying)", acked, err)
					break
				}
				k.node, k.killedAt, k.publishedAt = leader, time.Now(), next
				c.Kill(leader)
				killed = true
				t.Logf("killed the stream leader %s at %d acked, %d published", c.Name(leader), acked, next)
			case killed && k.pause == 0 && acked > max(pubStart, k.publishedAt):
				// A message published after the kill is acknowledged.
				k.pause, k.resumedAck = time.Since(k.killedAt), acked
				t.Logf("resumed at %d acked, %s after the kill", acked, k.pause.Round(time.Millisecond))
			case killed && k.pause > 0 && acked >= min(k.resumedAck+k.restart, N):
				c.Start(t, k.node)
				t.Logf("started %s again at %d acked, %s after its kill", c.Name(k.node), acked, time.Since(k.killedAt).Round(time.Millisecond))
				killed, restartedAck, restartedAt = false, acked, time.Now()
				cur++
			}
		}

		if next < N {
			body := strconv.Itoa(next)
			if err := pub.Publish(ctx, subject(next), body, []byte(body)); err != nil {
				continue // failed: rebuilt above
			}
			pub.Mark(uint64(next + 1))
			next++
			continue
		}
		if acked == N {
			cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
			err := pub.Close(cctx)
			ccancel()
			if err == nil {
				break
			}
			// All acknowledged, yet failed (the connection dropped after):
			// rebuild as after any failure; the stream holds all.
			failures = append(failures, fmt.Sprintf("[close, all acked] %v", err))
			var last uint64
			last, next = rebuild()
			pub, pubStart = newPub(last, next), next
			sessions++
		}
		select { // all published: await the acknowledgements
		case <-pub.Failed():
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Logf("all %d acknowledged after %s, %d publisher sessions", N, time.Since(started).Round(time.Millisecond), sessions)
	for _, f := range failures {
		t.Logf("publisher failure %s", f)
	}
	if len(rebuildErrs) > 0 {
		t.Logf("errors reading the stream's end while rebuilding (retried): %v", rebuildErrs)
	}
	if killed { // resumed, but the end came first
		c.Start(t, crashes[cur].node)
		cur++
	}
	for i, k := range crashes[:cur] {
		t.Logf("leader loss %d (%s, at %d published): pause %s (kill to the first acknowledgement of a message published after it)",
			i+1, c.Name(k.node), k.publishedAt, k.pause.Round(time.Millisecond))
	}
	if cur < len(crashes) {
		t.Errorf("only %d of %d leader kills happened before all was acknowledged", cur, len(crashes))
	}

	// Every replica current, the stream exactly 0..N-1.
	waitWhole(t, ctx, s, N)
	for seq := uint64(1); seq <= N; seq++ {
		var m *jetstream.RawStreamMsg
		retry(t, ctx, fmt.Sprintf("read message %d", seq), func(ctx context.Context) (err error) {
			m, err = s.GetMsg(ctx, seq)
			return err
		})
		want := strconv.FormatUint(seq-1, 10)
		if string(m.Data) != want || m.Header.Get(bus.HeaderID) != want {
			t.Fatalf("message %d holds %q (id %q), want index %s", seq, m.Data, m.Header.Get(bus.HeaderID), want)
		}
	}
	for i := 0; i < 3; i++ {
		logs := c.Logs(i)
		for _, bad := range []string{"critical write error", "NO quorum, stalled"} {
			if strings.Contains(logs, bad) {
				t.Errorf("%s logged %q", c.Name(i), bad)
			}
		}
	}
	t.Logf("done in %s", time.Since(started).Round(time.Millisecond))
}

// streamEnd reads the stream's last sequence and the index its last
// message carries: the publisher continues after them.
func streamEnd(ctx context.Context, s jetstream.Stream) (lastSeq uint64, next int, err error) {
	// Only the stream's leader answers: a request sent while there is none
	// goes unanswered, so keep the wait short and retry.
	ictx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	info, err := s.Info(ictx)
	if err != nil {
		return 0, 0, fmt.Errorf("stream info: %w", err)
	}
	if info.State.Msgs == 0 {
		return info.State.LastSeq, 0, nil
	}
	m, err := s.GetMsg(ictx, info.State.LastSeq)
	if err != nil {
		return 0, 0, fmt.Errorf("get the last message (%d): %w", info.State.LastSeq, err)
	}
	i, err := strconv.Atoi(string(m.Data))
	if err != nil || m.Header.Get(bus.HeaderID) != string(m.Data) {
		return 0, 0, fmt.Errorf("message %d is not one of this test's: %q, id %q", m.Sequence, m.Data, m.Header.Get(bus.HeaderID))
	}
	return info.State.LastSeq, i + 1, nil
}

// waitWhole waits until the stream has a leader and every replica is
// current (and, when msgs > 0, holds msgs messages at sequences 1..msgs).
func waitWhole(t *testing.T, ctx context.Context, s jetstream.Stream, msgs uint64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var why string
	for {
		ictx, cancel := context.WithTimeout(ctx, time.Second)
		info, err := s.Info(ictx)
		cancel()
		switch {
		case err != nil:
			why = err.Error()
		case info.Cluster == nil || info.Cluster.Leader == "":
			why = "no leader"
		case len(info.Cluster.Replicas) != 2:
			why = fmt.Sprintf("replicas %d, want 2 besides the leader", len(info.Cluster.Replicas))
		case msgs > 0 && (info.State.Msgs != msgs || info.State.FirstSeq != 1 || info.State.LastSeq != msgs):
			t.Fatalf("stream holds %d messages, sequences %d..%d; want %d at 1..%d", info.State.Msgs, info.State.FirstSeq, info.State.LastSeq, msgs, msgs)
		default:
			why = ""
			for _, r := range info.Cluster.Replicas {
				if !r.Current || r.Offline {
					why += fmt.Sprintf("%s current=%v offline=%v lag=%d; ", r.Name, r.Current, r.Offline, r.Lag)
				}
			}
			if why == "" {
				return
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("stream not whole within 20s: %s", why)
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// retry calls f until it succeeds, with a short back-off, failing the test
// when ctx ends first.
func retry(t *testing.T, ctx context.Context, what string, f func(context.Context) error) {
	t.Helper()
	for {
		fctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := f(fctx)
		cancel()
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s: %v", what, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

var digits = regexp.MustCompile(`[0-9]+`)

// TestLostRaceOnReplicatedBuckets: a compare-and-set that loses its race
// on a bucket with 3 replicas is a lost race to bus.LostRace (nats.go
// documents another error code, 10164, for replicated streams), or a
// lease takeover and a sink state change on a cluster would read it as a
// failure.
func TestLostRaceOnReplicatedBuckets(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node nats-server cluster")
	}
	c := natstest.NewCluster(t, 3)
	c.WaitReady(t)
	_, js := c.Connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var kv jetstream.KeyValue
	retry(t, ctx, "create the bucket", func(ctx context.Context) (err error) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "RACE", Replicas: 3})
		return err
	})
	rev, err := kv.Create(ctx, "k", []byte("1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Update(ctx, "k", []byte("2"), rev); err != nil {
		t.Fatal(err)
	}
	_, err = kv.Update(ctx, "k", []byte("3"), rev) // stale revision
	if err == nil || !bus.LostRace(err) {
		t.Fatalf("Update with a stale revision on 3 replicas: %v; LostRace must report it", err)
	}
	_, err = kv.Create(ctx, "k", []byte("4"))
	if err == nil || !bus.LostRace(err) {
		t.Fatalf("Create of an existing key on 3 replicas: %v; LostRace must report it", err)
	}
}
