// Package soak_test holds whole-pipeline soak tests: real PostgreSQL,
// JetStream (embedded, or a 3-node cluster of nats-server processes),
// s2local over HTTP, and capture, router and delivery as processes, under
// faults, verified from S2 alone. This file is what both tests share: the
// seeded workload and what it committed, the services, the S2 reader and
// the verifier.
package soak_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/proctest"
)

// soakBasin is the one basin every sink writes into.
const soakBasin = "soak-basin"

// Routing over three S2 streams by the group's key (items by id, lines by
// cart: a group always goes to one stream). routeBroken fails (division
// by zero) on a change whose record has poison = true; only items with
// id % 3 == 0 are ever poisoned, so a failed change, which the router
// sends to the sink's own stream soak-0, is in the stream its group routes
// to, and delivery can drain it there once the function is fixed.
const (
	routeFixed  = `{"stream": "soak-" + string((has(record.id) ? record.id : record.cart) % 3)}`
	routeBroken = `{"stream": "soak-" + string(has(record.poison) && record.poison ? record.v / 0 : (has(record.id) ? record.id : record.cart) % 3)}`
)

// schemaSQL is each source database's tables: items (REPLICA IDENTITY
// FULL, so a delete carries the row's v; poison makes the broken routing
// function fail) and lines (a two-column primary key, default identity:
// a delete carries the key only).
const schemaSQL = `
CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL, payload text NOT NULL, poison boolean NOT NULL DEFAULT false);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE lines (cart bigint NOT NULL, line bigint NOT NULL, v bigint NOT NULL, payload text NOT NULL, PRIMARY KEY (cart, line));
`

// seedFromEnv is PGS2_SOAK_SEED, or a new seed; it is logged at the start
// and again, with the command that replays it, when the test fails. env
// is what else the replay needs (e.g. "PGS2_SOAK=5m ").
func seedFromEnv(t *testing.T, env string) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("PGS2_SOAK_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("PGS2_SOAK_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (replay with PGS2_SOAK_SEED=%d)", seed, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d: replay with %sPGS2_SOAK_SEED=%d go test -count=1 -run '^%s$' -v ./soak/", seed, env, seed, t.Name())
		}
	})
	return seed
}

func newRand(seed, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, stream^0x9e3779b97f4a7c15))
}

// logLevel is the services' --log-level: PGS2_SOAK_LOG, default warn.
func logLevel() string {
	if v := os.Getenv("PGS2_SOAK_LOG"); v != "" {
		return v
	}
	return "warn"
}

// quietLog logs errors only (s2local's).
func quietLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
}

// ---------------------------------------------------------------------
// Configuration files.

type cfgParams struct {
	source, dsn, slot  string
	changes, delivery  string // stream names; "" = the defaults
	natsURL            string
	replicas           int
	endpoint, routing  string
	retryMax, retryIni string
}

func configYAML(p cfgParams) string {
	var b strings.Builder
	fmt.Fprintf(&b, "source: {name: %s, dsn: %q, slot: %s, publication: pgs2, tables: [public.items, public.lines]}\n", p.source, p.dsn, p.slot)
	fmt.Fprintf(&b, "nats: {url: %q, replicas: %d, partitions: 8", p.natsURL, p.replicas)
	if p.changes != "" {
		fmt.Fprintf(&b, ", changes_stream: %s", p.changes)
	}
	if p.delivery != "" {
		fmt.Fprintf(&b, ", delivery_stream: %s", p.delivery)
	}
	b.WriteString("}\n")
	fmt.Fprintf(&b, `sinks:
  - name: soak
    tables: [public.items, public.lines]
    basin: %s
    stream: soak-0
    routing: '%s'
    endpoint: %s
    create_stream: true
    batch: {linger: 5ms}
    retry: {initial: %s, max: %s}
`, soakBasin, p.routing, p.endpoint, p.retryIni, p.retryMax)
	return b.String()
}

// writeFile replaces path's content atomically (a service reloading on
// SIGHUP never reads half a file).
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// ---------------------------------------------------------------------
// Services as processes.

// svc is one service process, killed and started again by the test.
type svc struct {
	name string
	bin  string
	cfg  string
	proc *proctest.Proc   // nil while killed
	all  []*proctest.Proc // every run, for the output
	runs int
}

func (s *svc) start(t *testing.T) time.Duration {
	t.Helper()
	began := time.Now()
	s.proc = proctest.Start(t, s.bin, "--config", s.cfg, "--log-level", logLevel())
	s.all = append(s.all, s.proc)
	s.runs++
	return time.Since(began)
}

func (s *svc) kill() {
	if s.proc != nil {
		s.proc.Kill()
		s.proc = nil
	}
}

func (s *svc) up() bool { return s.proc != nil }

// exited reports whether the running process ended by itself.
func (s *svc) exited() bool {
	return s.proc != nil && s.proc.Cmd.Process.Signal(syscall.Signal(0)) != nil
}

// logSummary counts a service's warnings and errors by message, over all
// its runs: `2× WARN "router session ended; restarting"`.
func (s *svc) logSummary() string {
	counts := map[string]int{}
	for _, p := range s.all {
		for _, line := range strings.Split(p.Output(), "\n") {
			lvl := ""
			switch {
			case strings.Contains(line, "level=WARN"):
				lvl = "WARN"
			case strings.Contains(line, "level=ERROR"):
				lvl = "ERROR"
			default:
				if strings.TrimSpace(line) != "" && !strings.Contains(line, "level=") {
					lvl = "OUTPUT" // not a log line: a panic, a fatal error
				} else {
					continue
				}
			}
			msg := line
			if i := strings.Index(line, "msg="); i >= 0 {
				msg = line[i+4:]
				if strings.HasPrefix(msg, `"`) {
					if j := strings.Index(msg[1:], `"`); j >= 0 {
						msg = msg[:j+2]
					}
				} else if j := strings.IndexByte(msg, ' '); j >= 0 {
					msg = msg[:j]
				}
			}
			if len(msg) > 160 {
				msg = msg[:160]
			}
			counts[lvl+" "+msg]++
		}
	}
	var out []string
	for k, n := range counts {
		out = append(out, fmt.Sprintf("%d× %s", n, k))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

func (s *svc) hup() {
	if s.proc != nil {
		_ = s.proc.Cmd.Process.Signal(syscall.SIGHUP)
	}
}

// checkAlive fails the test when a service the test did not kill exited:
// nothing supervises them, they must ride through every fault.
func checkAlive(t *testing.T, svcs []*svc) {
	t.Helper()
	for _, s := range svcs {
		if s.exited() {
			out := s.proc.Output()
			if len(out) > 20000 {
				out = "…" + out[len(out)-20000:]
			}
			t.Fatalf("%s (run %d) exited by itself; nothing restarts it, so the pipeline stops here. Its output:\n%s", s.name, s.runs, out)
		}
	}
}

// ---------------------------------------------------------------------
// The workload and what it committed.

// event is one change as S2's record body tells it: source database,
// table, primary key, action and v (-1: the body carries none, a delete
// of lines).
type event struct {
	db, table, key, action string
	v                      int64
}

func (e event) group() string { return e.db + "/" + e.table + "/" + e.key }

func (e event) id() string { return e.group() + "/" + e.action + "/" + strconv.FormatInt(e.v, 10) }

func (e event) String() string {
	if e.v < 0 {
		return e.group() + " " + e.action
	}
	return fmt.Sprintf("%s %s v=%d", e.group(), e.action, e.v)
}

// stream is the S2 stream routeFixed sends the event's group to.
func (e event) stream() string {
	k := e.key
	k = strings.TrimPrefix(k, "id=")
	k = strings.TrimPrefix(k, "cart=")
	if i := strings.IndexByte(k, ','); i >= 0 {
		k = k[:i]
	}
	n, _ := strconv.ParseInt(k, 10, 64)
	return "soak-" + strconv.FormatInt(n%3, 10)
}

// committed is a change the workload committed.
type committed struct {
	ev  event
	at  time.Time // when its COMMIT returned
	big bool      // larger than S2 takes: delivery parks it, an operator acknowledges it
	// poison makes the broken routing function fail: delivery parks it
	// until the function is fixed.
	poison bool
}

// keySet is a set with uniform, deterministic random picks.
type keySet[K comparable] struct {
	keys []K
	idx  map[K]int
}

func newKeySet[K comparable]() *keySet[K] { return &keySet[K]{idx: map[K]int{}} }

func (s *keySet[K]) has(k K) bool { _, ok := s.idx[k]; return ok }
func (s *keySet[K]) len() int     { return len(s.keys) }

func (s *keySet[K]) add(k K) {
	if !s.has(k) {
		s.idx[k] = len(s.keys)
		s.keys = append(s.keys, k)
	}
}

func (s *keySet[K]) remove(k K) {
	i, ok := s.idx[k]
	if !ok {
		return
	}
	last := s.keys[len(s.keys)-1]
	s.keys[i] = last
	s.idx[last] = i
	s.keys = s.keys[:len(s.keys)-1]
	delete(s.idx, k)
}

func (s *keySet[K]) pick(rng *rand.Rand) K { return s.keys[rng.IntN(len(s.keys))] }

// dbSource is one source database as the workload drives it.
type dbSource struct {
	name  string // the database and the source
	conn  *pgx.Conn
	items *keySet[int64]
	itemV map[int64]int64 // id → the row's v (also after a delete: a new row goes on from it)
	lines *keySet[[2]int64]
	lineV map[[2]int64]int64
}

// window is a range of workload steps [from, to).
type window struct{ from, to int }

// workload runs seeded transactions against every source, one step (a
// transaction per source) at a time, paced at rate steps per second.
// Everything it does follows from its seed; faults are placed by its step
// count.
type workload struct {
	rng   *rand.Rand
	srcs  []*dbSource
	rate  float64
	steps int
	// itemSpace and cartSpace bound the keys (rows are deleted and made
	// again).
	itemSpace, cartSpace int64
	bigAt                map[int]int // step → source index: an update larger than S2 takes
	poison               []window    // steps when items may be poisoned (the functions are broken then)

	step     atomic.Int64
	stop     atomic.Bool // ends the run early (after the current step)
	nchanges atomic.Int64
	poisoned atomic.Int64 // poisoned changes committed

	mu      sync.Mutex
	changes []committed
	bigs    map[string]bool // event ids of the big changes
	parked  map[string]bool // groups with a big or a poisoned change: parked on purpose
	done    chan struct{}
	err     error
}

func newWorkload(seed uint64, rate float64, steps int) *workload {
	return &workload{rng: newRand(seed, 1), rate: rate, steps: steps, itemSpace: 500, cartSpace: 150,
		bigAt: map[int]int{}, bigs: map[string]bool{}, parked: map[string]bool{}, done: make(chan struct{})}
}

// addSource connects to database db and loads its first rows.
func (w *workload) addSource(t *testing.T, ctx context.Context, dsn, db string) {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	s := &dbSource{name: db, conn: conn, items: newKeySet[int64](), itemV: map[int64]int64{},
		lines: newKeySet[[2]int64](), lineV: map[[2]int64]int64{}}
	w.srcs = append(w.srcs, s)
}

// load inserts each source's first rows (250 items, 100 carts of 3
// lines), recorded like any change.
func (w *workload) load(ctx context.Context) error {
	for _, s := range w.srcs {
		tx, err := s.conn.Begin(ctx)
		if err != nil {
			return err
		}
		var evs []committed
		rows, err := tx.Query(ctx, `INSERT INTO items (id, v, payload) SELECT g, 0, repeat('i', (g % 97) + 10) FROM generate_series(1, 250) g RETURNING id, v`)
		if err != nil {
			return err
		}
		for rows.Next() {
			var id, v int64
			if err := rows.Scan(&id, &v); err != nil {
				return err
			}
			s.items.add(id)
			s.itemV[id] = v
			evs = append(evs, committed{ev: event{s.name, "items", "id=" + strconv.FormatInt(id, 10), "insert", v}})
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows, err = tx.Query(ctx, `INSERT INTO lines (cart, line, v, payload) SELECT c, l, 0, repeat('l', (c*7 + l) % 200 + 10) FROM generate_series(1, 100) c, generate_series(1, 3) l RETURNING cart, line, v`)
		if err != nil {
			return err
		}
		for rows.Next() {
			var c, l, v int64
			if err := rows.Scan(&c, &l, &v); err != nil {
				return err
			}
			k := [2]int64{c, l}
			s.lines.add(k)
			s.lineV[k] = v
			evs = append(evs, committed{ev: event{s.name, "lines", lineKey(k), "insert", v}})
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
		w.record(evs, time.Now())
	}
	return nil
}

func lineKey(k [2]int64) string {
	return "cart=" + strconv.FormatInt(k[0], 10) + ",line=" + strconv.FormatInt(k[1], 10)
}

func (w *workload) record(evs []committed, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range evs {
		c.at = at
		w.changes = append(w.changes, c)
		if c.big {
			w.bigs[c.ev.id()] = true
		}
		if c.big || c.poison {
			w.parked[c.ev.group()] = true
		}
	}
	w.nchanges.Add(int64(len(evs)))
}

// run executes every step, paced; its error (if any) is in w.err once
// w.done is closed.
func (w *workload) run(ctx context.Context) {
	defer close(w.done)
	start := time.Now()
	interval := time.Duration(float64(time.Second) / w.rate)
	for step := 0; step < w.steps && !w.stop.Load(); step++ {
		if d := time.Until(start.Add(time.Duration(step) * interval)); d > 0 {
			select {
			case <-ctx.Done():
				w.err = ctx.Err()
				return
			case <-time.After(d):
			}
		}
		for i, s := range w.srcs {
			big := false
			if si, ok := w.bigAt[step]; ok && si == i {
				big = true
			}
			if err := w.txn(ctx, s, step, big); err != nil {
				w.err = fmt.Errorf("step %d, source %s: %w", step, s.name, err)
				return
			}
		}
		w.step.Store(int64(step + 1))
	}
}

func (w *workload) poisonNow(step int) bool {
	for _, p := range w.poison {
		if step >= p.from && step < p.to {
			return true
		}
	}
	return false
}

// payload is 10 B to 4 KiB of letters, log-uniformly.
func (w *workload) payload() string {
	n := int(10 * math.Pow(409.6, w.rng.Float64()))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('a' + w.rng.IntN(26))
	}
	return string(b)
}

// bigPayload is 1.1 MiB: its record is over S2's 1 MiB limit.
func (w *workload) bigPayload() string {
	chunk := make([]byte, 4096)
	for i := range chunk {
		chunk[i] = byte('A' + w.rng.IntN(26))
	}
	return strings.Repeat(string(chunk), (1<<20+100<<10)/4096)
}

// txn runs one seeded transaction of inserts, updates and deletes (now and
// then a bulk update of many items) on source s.
func (w *workload) txn(ctx context.Context, s *dbSource, step int, big bool) error {
	rng := w.rng
	tx, err := s.conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	var evs []committed
	var poisoned int64
	ops := 1 + rng.IntN(3)
	switch r := rng.IntN(100); {
	case r < 20:
		ops = 4 + rng.IntN(5)
	case r < 23:
		ops = -1 // bulk
	}
	if ops < 0 && s.items.len() > 20 {
		n := 20 + rng.IntN(min(80, s.items.len()-10))
		seen := map[int64]bool{}
		var ids []int64
		for len(ids) < n {
			id := s.items.pick(rng)
			if !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
		rows, err := tx.Query(ctx, `UPDATE items SET v = v + 1, payload = $2, poison = false WHERE id = ANY($1) RETURNING id, v`, ids, w.payload())
		if err != nil {
			return fmt.Errorf("bulk update: %w", err)
		}
		for rows.Next() {
			var id, v int64
			if err := rows.Scan(&id, &v); err != nil {
				return err
			}
			if v != s.itemV[id]+1 {
				return fmt.Errorf("bulk update of item %d returned v=%d, want %d", id, v, s.itemV[id]+1)
			}
			s.itemV[id] = v
			evs = append(evs, committed{ev: event{s.name, "items", "id=" + strconv.FormatInt(id, 10), "update", v}})
		}
		if err := rows.Err(); err != nil {
			return err
		}
		ops = 1 + rng.IntN(2)
	} else if ops < 0 {
		ops = 1
	}
	for i := 0; i < ops; i++ {
		var ev event
		var err error
		if rng.IntN(2) == 0 {
			var p bool
			ev, p, err = w.itemOp(ctx, tx, s, step)
			if p {
				poisoned++
			}
			if err != nil {
				return err
			}
			evs = append(evs, committed{ev: ev, poison: p})
			continue
		}
		ev, err = w.lineOp(ctx, tx, s)
		if err != nil {
			return err
		}
		evs = append(evs, committed{ev: ev})
	}
	if big && s.lines.len() > 0 {
		k := s.lines.pick(rng)
		var v int64
		if err := tx.QueryRow(ctx, `UPDATE lines SET v = v + 1, payload = $3 WHERE cart = $1 AND line = $2 RETURNING v`, k[0], k[1], w.bigPayload()).Scan(&v); err != nil {
			return fmt.Errorf("big update: %w", err)
		}
		if v != s.lineV[k]+1 {
			return fmt.Errorf("big update of line %v returned v=%d, want %d", k, v, s.lineV[k]+1)
		}
		s.lineV[k] = v
		evs = append(evs, committed{ev: event{s.name, "lines", lineKey(k), "update", v}, big: true})
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	w.record(evs, time.Now())
	w.poisoned.Add(poisoned)
	return nil
}

func (w *workload) itemOp(ctx context.Context, tx pgx.Tx, s *dbSource, step int) (ev event, poisoned bool, err error) {
	rng := w.rng
	op := rng.IntN(100)
	if s.items.len() == 0 {
		op = 99
	}
	if op >= 85 { // insert
		for try := 0; try < 5; try++ {
			id := 1 + rng.Int64N(w.itemSpace)
			if s.items.has(id) {
				continue
			}
			v := int64(0)
			if last, ok := s.itemV[id]; ok {
				v = last + 1
			}
			var got int64
			if err := tx.QueryRow(ctx, `INSERT INTO items (id, v, payload) VALUES ($1, $2, $3) RETURNING v`, id, v, w.payload()).Scan(&got); err != nil {
				return event{}, false, fmt.Errorf("insert item %d: %w", id, err)
			}
			s.items.add(id)
			s.itemV[id] = got
			return event{s.name, "items", "id=" + strconv.FormatInt(id, 10), "insert", got}, false, nil
		}
		if s.items.len() == 0 {
			return event{}, false, errors.New("no item to insert or update")
		}
		op = 0 // the space is full: update instead
	}
	id := s.items.pick(rng)
	key := "id=" + strconv.FormatInt(id, 10)
	if op >= 70 { // delete
		var v int64
		if err := tx.QueryRow(ctx, `DELETE FROM items WHERE id = $1 RETURNING v`, id).Scan(&v); err != nil {
			return event{}, false, fmt.Errorf("delete item %d: %w", id, err)
		}
		s.items.remove(id)
		return event{s.name, "items", key, "delete", v}, false, nil
	}
	poison := id%3 == 0 && w.poisonNow(step) && rng.IntN(4) == 0
	var v int64
	if err := tx.QueryRow(ctx, `UPDATE items SET v = v + 1, payload = $2, poison = $3 WHERE id = $1 RETURNING v`, id, w.payload(), poison).Scan(&v); err != nil {
		return event{}, false, fmt.Errorf("update item %d: %w", id, err)
	}
	if v != s.itemV[id]+1 {
		return event{}, false, fmt.Errorf("update of item %d returned v=%d, want %d", id, v, s.itemV[id]+1)
	}
	s.itemV[id] = v
	return event{s.name, "items", key, "update", v}, poison, nil
}

func (w *workload) lineOp(ctx context.Context, tx pgx.Tx, s *dbSource) (event, error) {
	rng := w.rng
	op := rng.IntN(100)
	if s.lines.len() == 0 {
		op = 99
	}
	if op >= 85 { // insert
		for try := 0; try < 5; try++ {
			k := [2]int64{1 + rng.Int64N(w.cartSpace), 1 + rng.Int64N(4)}
			if s.lines.has(k) {
				continue
			}
			v := int64(0)
			if last, ok := s.lineV[k]; ok {
				v = last + 1
			}
			var got int64
			if err := tx.QueryRow(ctx, `INSERT INTO lines (cart, line, v, payload) VALUES ($1, $2, $3, $4) RETURNING v`, k[0], k[1], v, w.payload()).Scan(&got); err != nil {
				return event{}, fmt.Errorf("insert line %v: %w", k, err)
			}
			s.lines.add(k)
			s.lineV[k] = got
			return event{s.name, "lines", lineKey(k), "insert", got}, nil
		}
		if s.lines.len() == 0 {
			return event{}, errors.New("no line to insert or update")
		}
		op = 0
	}
	k := s.lines.pick(rng)
	if op >= 70 { // delete: the body carries the key only
		var v int64
		if err := tx.QueryRow(ctx, `DELETE FROM lines WHERE cart = $1 AND line = $2 RETURNING v`, k[0], k[1]).Scan(&v); err != nil {
			return event{}, fmt.Errorf("delete line %v: %w", k, err)
		}
		s.lines.remove(k)
		return event{s.name, "lines", lineKey(k), "delete", -1}, nil
	}
	var v int64
	if err := tx.QueryRow(ctx, `UPDATE lines SET v = v + 1, payload = $3 WHERE cart = $1 AND line = $2 RETURNING v`, k[0], k[1], w.payload()).Scan(&v); err != nil {
		return event{}, fmt.Errorf("update line %v: %w", k, err)
	}
	if v != s.lineV[k]+1 {
		return event{}, fmt.Errorf("update of line %v returned v=%d, want %d", k, v, s.lineV[k]+1)
	}
	s.lineV[k] = v
	return event{s.name, "lines", lineKey(k), "update", v}, nil
}

// isBig reports whether ev is one of the changes the workload made too
// large for S2.
func (w *workload) isBig(ev event) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.bigs[ev.id()]
}

func (w *workload) bigCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.bigs)
}

// parkedGroups is the groups parked on purpose (a copy).
func (w *workload) parkedGroups() map[string]bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]bool, len(w.parked))
	for g := range w.parked {
		out[g] = true
	}
	return out
}

// snapshot is every change committed so far, in commit order per source.
func (w *workload) snapshot() []committed {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]committed(nil), w.changes...)
}

// ---------------------------------------------------------------------
// Reading S2.

// obs is one record read from S2: its stream, seq_num, when the test first
// saw it, and what its body says.
type obs struct {
	stream string
	seq    uint64
	at     time.Time
	ev     event
	pos    string // pgs2-seq header: for diagnostics only, never verified
}

// recBody is what the verifier reads of a record's body (Sequin's message
// format): the row's key and v, the action, the source database and table.
type recBody struct {
	Record struct {
		ID   *int64 `json:"id"`
		Cart *int64 `json:"cart"`
		Line *int64 `json:"line"`
		V    *int64 `json:"v"`
	} `json:"record"`
	Action   string `json:"action"`
	Metadata struct {
		DB     string `json:"database_name"`
		Schema string `json:"table_schema"`
		Table  string `json:"table_name"`
	} `json:"metadata"`
}

func parseEvent(body []byte) (event, error) {
	var b recBody
	if err := json.Unmarshal(body, &b); err != nil {
		return event{}, err
	}
	ev := event{db: b.Metadata.DB, table: b.Metadata.Table, action: b.Action, v: -1}
	if b.Record.V != nil {
		ev.v = *b.Record.V
	}
	switch {
	case b.Metadata.Schema != "public":
		return ev, fmt.Errorf("table schema %q", b.Metadata.Schema)
	case ev.table == "items" && b.Record.ID != nil:
		ev.key = "id=" + strconv.FormatInt(*b.Record.ID, 10)
	case ev.table == "lines" && b.Record.Cart != nil && b.Record.Line != nil:
		ev.key = lineKey([2]int64{*b.Record.Cart, *b.Record.Line})
	default:
		return ev, fmt.Errorf("no primary key for table %q in the record", ev.table)
	}
	return ev, nil
}

// collector reads every stream of the basin through the S2 SDK, from the
// first record on, noting when each record first showed up.
type collector struct {
	sdk   *s2.Client
	basin string

	mu      sync.Mutex
	next    map[string]uint64
	obs     []obs
	bad     []string // records whose body is not a change
	readErr map[string]int
	stop    chan struct{}
	stopped chan struct{}
}

func newCollector(endpoint, basin string) *collector {
	base := strings.TrimRight(endpoint, "/") + "/v1"
	sdk := s2.New("local", &s2.ClientOptions{BaseURL: base, MakeBasinBaseURL: func(string) string { return base },
		RequestTimeout: 10 * time.Second})
	return &collector{sdk: sdk, basin: basin, next: map[string]uint64{}, readErr: map[string]int{}}
}

// run polls every interval until stopAndDrain.
func (c *collector) run(interval time.Duration) {
	c.stop, c.stopped = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(c.stopped)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			c.poll()
			select {
			case <-c.stop:
				return
			case <-t.C:
			}
		}
	}()
}

// stopAndDrain stops polling and reads to every stream's tail once more.
func (c *collector) stopAndDrain() {
	if c.stop != nil {
		close(c.stop)
		<-c.stopped
		c.stop = nil
	}
	c.poll()
}

func (c *collector) poll() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var names []string
	it := c.sdk.Basin(c.basin).Streams.Iter(ctx, nil)
	for it.Next() {
		names = append(names, string(it.Value().Name))
	}
	if err := it.Err(); err != nil {
		c.noteErr("list streams: " + err.Error())
		return
	}
	sort.Strings(names)
	clamp := true
	for _, name := range names {
		for {
			c.mu.Lock()
			start := c.next[name]
			c.mu.Unlock()
			count := uint64(1000)
			b, err := c.sdk.Basin(c.basin).Stream(s2.StreamName(name)).Read(ctx, &s2.ReadOptions{SeqNum: &start, Count: &count, Clamp: &clamp})
			var se *s2.S2Error
			if errors.As(err, &se) && se.Status == 416 {
				break // at the tail
			}
			if err != nil {
				c.noteErr("read " + name + ": " + err.Error())
				break
			}
			if len(b.Records) == 0 {
				break
			}
			now := time.Now()
			c.mu.Lock()
			for _, r := range b.Records {
				if r.SeqNum < start {
					continue
				}
				start = r.SeqNum + 1
				if len(r.Headers) == 1 && len(r.Headers[0].Name) == 0 {
					continue // a command record (fence)
				}
				ev, err := parseEvent(r.Body)
				if err != nil {
					c.bad = append(c.bad, fmt.Sprintf("%s record %d: %v: %.200s", name, r.SeqNum, err, r.Body))
					continue
				}
				o := obs{stream: name, seq: r.SeqNum, at: now, ev: ev}
				for _, h := range r.Headers {
					if string(h.Name) == "pgs2-seq" {
						o.pos = string(h.Value)
					}
				}
				c.obs = append(c.obs, o)
			}
			c.next[name] = start
			c.mu.Unlock()
		}
	}
}

func (c *collector) noteErr(s string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.readErr[digitsOut(s)]++
}

func digitsOut(s string) string {
	b := []byte(s)
	for i, ch := range b {
		if ch >= '0' && ch <= '9' {
			b[i] = '#'
		}
	}
	return string(b)
}

func (c *collector) snapshot() []obs {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]obs(nil), c.obs...)
}

func (c *collector) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.obs)
}

// ---------------------------------------------------------------------
// Verifying.

// expectation is what S2 must hold: every committed change except those
// acknowledged (dropped on purpose by the operator), per group in commit
// order.
type expectation struct {
	groups map[string][]event
	count  map[string]int // event id → times expected
	total  int
}

func expect(changes []committed, acked map[string]bool) *expectation {
	x := &expectation{groups: map[string][]event{}, count: map[string]int{}}
	for _, c := range changes {
		if acked[c.ev.id()] {
			continue
		}
		x.groups[c.ev.group()] = append(x.groups[c.ev.group()], c.ev)
		x.count[c.ev.id()]++
		x.total++
	}
	return x
}

// missing lists expected changes S2 does not hold yet (by multiplicity).
func (x *expectation) missing(got []obs) []event {
	seen := map[string]int{}
	for _, o := range got {
		seen[o.ev.id()]++
	}
	var out []event
	for _, evs := range x.groups {
		need := map[string]int{}
		for _, e := range evs {
			need[e.id()]++
			if need[e.id()] > seen[e.id()] {
				out = append(out, e)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id() < out[j].id() })
	return out
}

// verify checks S2's records against x: each group in exactly one stream
// (the one its key routes to), every expected change there exactly once,
// in commit order (v going up by one per update and insert), nothing else.
// It returns the problems found and a summary.
func verify(x *expectation, got []obs, acked map[string]bool) (problems []string, dups, missing, extra int) {
	byGroup := map[string][]obs{}
	for _, o := range got {
		byGroup[o.ev.group()] = append(byGroup[o.ev.group()], o)
	}
	var groups []string
	for g := range x.groups {
		groups = append(groups, g)
	}
	for g := range byGroup {
		if _, ok := x.groups[g]; !ok {
			groups = append(groups, g)
		}
	}
	sort.Strings(groups)
	for _, g := range groups {
		want, have := x.groups[g], byGroup[g]
		streams := map[string]bool{}
		for _, o := range have {
			streams[o.stream] = true
		}
		if len(have) > 0 {
			if len(streams) > 1 {
				problems = append(problems, fmt.Sprintf("group %s is in %d S2 streams %v; a group has one", g, len(streams), keys(streams)))
			} else if s := have[0].stream; s != have[0].ev.stream() {
				problems = append(problems, fmt.Sprintf("group %s is in %s; its key routes it to %s", g, s, have[0].ev.stream()))
			}
		}
		wantN, haveN := map[string]int{}, map[string]int{}
		for _, e := range want {
			wantN[e.id()]++
		}
		for _, o := range have {
			haveN[o.ev.id()]++
		}
		for id, n := range haveN {
			switch {
			case acked[id]:
				extra += n
				problems = append(problems, fmt.Sprintf("%s: acknowledged (dropped) by the operator, yet %d× in S2", id, n))
			case wantN[id] == 0:
				extra += n
				problems = append(problems, fmt.Sprintf("%s: in S2 %d× but never committed", id, n))
			case n > wantN[id]:
				dups += n - wantN[id]
				var where []string
				for _, o := range have {
					if o.ev.id() == id {
						where = append(where, fmt.Sprintf("%s#%d (pgs2-seq %s)", o.stream, o.seq, o.pos))
					}
				}
				problems = append(problems, fmt.Sprintf("%s: DUPLICATE, %d× in S2 (want %d) at %s", id, n, wantN[id], strings.Join(where, ", ")))
			}
		}
		for id, n := range wantN {
			if haveN[id] < n {
				missing += n - haveN[id]
				problems = append(problems, fmt.Sprintf("%s: MISSING from S2 (%d of %d there)", id, haveN[id], n))
			}
		}
		// Order, against the commit sequence: each change S2 holds takes
		// its place among its group's changes (duplicates and strays are
		// reported above).
		pos := map[string][]int{}
		for i, e := range want {
			pos[e.id()] = append(pos[e.id()], i)
		}
		occ := map[string]int{}
		prev := -1
		var firsts []obs // S2's records of the group without repeats
		for _, o := range have {
			id := o.ev.id()
			k := occ[id]
			occ[id]++
			if k >= len(pos[id]) {
				continue
			}
			firsts = append(firsts, o)
			i := pos[id][k]
			if i < prev {
				problems = append(problems, fmt.Sprintf("group %s OUT OF COMMIT ORDER: S2 has %s (%s#%d) after %s, which was committed after it",
					g, o.ev, o.stream, o.seq, want[prev]))
				break
			}
			prev = i
		}
		// Order, from the bodies alone: v goes up by one with every insert
		// and update (past the acknowledged ones); an items delete carries
		// the v it deleted.
		lastV := int64(-1)
		for _, o := range firsts {
			switch o.ev.action {
			case "insert", "update":
				next := lastV + 1
				for acked[o.ev.group()+"/update/"+strconv.FormatInt(next, 10)] {
					next++
				}
				if o.ev.v != next {
					problems = append(problems, fmt.Sprintf("group %s: S2 has %s (%s#%d) after v=%d; v must go up by one", g, o.ev, o.stream, o.seq, lastV))
				}
				lastV = o.ev.v
			case "delete":
				if o.ev.v >= 0 && o.ev.v != lastV {
					problems = append(problems, fmt.Sprintf("group %s: S2 has %s (%s#%d) after v=%d", g, o.ev, o.stream, o.seq, lastV))
				}
			}
		}
	}
	return problems, dups, missing, extra
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ---------------------------------------------------------------------
// Diagnostics when S2 is wrong: which stage first holds a change twice.

// streamDups reads a changes or delivery stream from its first message and
// counts the changes (batch entries, by idempotency key) it holds more
// than once, with a few examples ("key at seq.idx and seq.idx"). For
// failure messages only: the verdict comes from S2.
func streamDups(ctx context.Context, js jetstream.JetStream, stream string) (entries, dups int, examples []string, err error) {
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return 0, 0, nil, err
	}
	where := map[string][]string{}
	var e bus.Entry
	for {
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return entries, dups, examples, err
		}
		n := 0
		var pending uint64 = 1
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				return entries, dups, examples, err
			}
			pending = md.NumPending
			r := bus.NewBatchReader(m.Data())
			for i := 0; r.Next(&e); i++ {
				entries++
				k := string(e.Key)
				where[k] = append(where[k], fmt.Sprintf("%d.%d", md.Sequence.Stream, i))
			}
		}
		if batch.Error() != nil && n == 0 {
			return entries, dups, examples, batch.Error()
		}
		if n == 0 || pending == 0 {
			break
		}
	}
	var ks []string
	for k, w := range where {
		if len(w) > 1 {
			dups += len(w) - 1
			ks = append(ks, k)
		}
	}
	sort.Strings(ks)
	for i, k := range ks {
		if i == 5 {
			break
		}
		examples = append(examples, fmt.Sprintf("key %s at %s", k, strings.Join(where[k], " and ")))
	}
	return entries, dups, examples, nil
}

// stageReport says, for each changes and delivery stream, how many
// changes it holds and how many of them twice.
func stageReport(js jetstream.JetStream, streams []string) string {
	var out []string
	for _, st := range streams {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		n, d, ex, err := streamDups(ctx, js, st)
		cancel()
		line := fmt.Sprintf("%s: %d changes, %d held twice or more", st, n, d)
		if err != nil {
			line += fmt.Sprintf(" (read error: %v)", err)
		}
		if len(ex) > 0 {
			line += "; e.g. " + strings.Join(ex, "; ")
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n  ")
}

// ---------------------------------------------------------------------
// Lags: how long changes took from COMMIT to S2.

type lagged struct {
	at  time.Time // commit
	lag time.Duration
}

// lags pairs each committed change with its first arrival in S2 (by event
// id and occurrence) and returns them in commit order, leaving out the
// groups in skip (parked on purpose: they wait for a fix or an operator).
func lags(changes []committed, got []obs, skip map[string]bool) []lagged {
	times := map[string][]time.Time{}
	for _, c := range changes {
		times[c.ev.id()] = append(times[c.ev.id()], c.at)
	}
	occ := map[string]int{}
	var out []lagged
	for _, o := range got {
		id := o.ev.id()
		i := occ[id]
		occ[id]++
		if skip[o.ev.group()] {
			continue
		}
		if i < len(times[id]) {
			out = append(out, lagged{at: times[id][i], lag: o.at.Sub(times[id][i])})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].at.Before(out[j].at) })
	return out
}

// maxLag is the longest lag of the changes committed in [from, to).
func maxLag(l []lagged, from, to time.Time) (time.Duration, int) {
	i := sort.Search(len(l), func(i int) bool { return !l[i].at.Before(from) })
	var m time.Duration
	n := 0
	for ; i < len(l) && l[i].at.Before(to); i++ {
		m = max(m, l[i].lag)
		n++
	}
	return m, n
}

// timeline is the longest lag of the changes committed in each period
// since start: "+0s 80ms, +2s 95ms, …".
func timeline(l []lagged, start time.Time, period time.Duration) string {
	var out []string
	var cur time.Duration
	bucket := -1
	flush := func() {
		if bucket >= 0 {
			out = append(out, fmt.Sprintf("+%ds %s", int((time.Duration(bucket)*period).Seconds()), cur.Round(10*time.Millisecond)))
		}
	}
	for _, x := range l {
		b := int(x.at.Sub(start) / period)
		if x.at.Before(start) {
			b = 0
		}
		if b != bucket {
			flush()
			bucket, cur = b, 0
		}
		cur = max(cur, x.lag)
	}
	flush()
	return strings.Join(out, ", ")
}

// percentile of the lags (p in 0..100).
func percentile(l []lagged, p float64) time.Duration {
	if len(l) == 0 {
		return 0
	}
	d := make([]time.Duration, len(l))
	for i, x := range l {
		d[i] = x.lag
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[min(len(d)-1, int(float64(len(d))*p/100))]
}

// longestGap is the longest time in [from, to) that one S2 stream went
// without a new record, and that stream.
func longestGap(got []obs, from, to time.Time) (time.Duration, string) {
	prev := map[string]time.Time{}
	for _, o := range got {
		if o.at.Before(from) {
			prev[o.stream] = from
		}
	}
	var m time.Duration
	var which string
	for _, o := range got {
		if o.at.Before(from) {
			continue
		}
		if !o.at.Before(to) {
			break
		}
		p, ok := prev[o.stream]
		if !ok {
			p = from
		}
		if g := o.at.Sub(p); g > m {
			m, which = g, o.stream
		}
		prev[o.stream] = o.at
	}
	for st, p := range prev {
		if g := to.Sub(p); g > m {
			m, which = g, st
		}
	}
	return m, which
}

// servicePath is a service's main package, relative to this one.
func servicePath(name string) string { return filepath.Join("..", "services", name) }

// TestVerifierFinds checks the verifier itself on made-up S2 contents: a
// faithful copy passes; a duplicate, a missing change, two swapped
// changes, an acknowledged change present, a group split over streams and
// a stray record are each reported.
func TestVerifierFinds(t *testing.T) {
	ev := func(key, action string, v int64) event { return event{"app", "items", key, action, v} }
	changes := []committed{
		{ev: ev("id=3", "insert", 0)}, {ev: ev("id=3", "update", 1)}, {ev: ev("id=3", "update", 2), big: true},
		{ev: ev("id=3", "update", 3)}, {ev: ev("id=3", "delete", 3)}, {ev: ev("id=3", "insert", 4)},
		{ev: ev("id=4", "insert", 0)}, {ev: ev("id=4", "update", 1)},
	}
	acked := map[string]bool{changes[2].ev.id(): true}
	x := expect(changes, acked)
	faithful := func() []obs {
		var out []obs
		for _, c := range changes {
			if !acked[c.ev.id()] {
				out = append(out, obs{stream: c.ev.stream(), seq: uint64(len(out)), ev: c.ev})
			}
		}
		return out
	}
	if p, _, _, _ := verify(x, faithful(), acked); len(p) != 0 {
		t.Fatalf("a faithful copy: %v", p)
	}
	if m := x.missing(faithful()); len(m) != 0 {
		t.Fatalf("a faithful copy misses %v", m)
	}
	for _, c := range []struct {
		name string
		edit func([]obs) []obs
		want string
	}{
		{"duplicate", func(o []obs) []obs { return append(o[:3:3], append([]obs{o[2]}, o[3:]...)...) }, "DUPLICATE"},
		{"missing", func(o []obs) []obs { return append(o[:1:1], o[2:]...) }, "MISSING"},
		{"swapped", func(o []obs) []obs { o[1], o[2] = o[2], o[1]; return o }, "OUT OF COMMIT ORDER"},
		{"acknowledged", func(o []obs) []obs {
			return append(o[:2:2], append([]obs{{stream: "soak-0", ev: changes[2].ev}}, o[2:]...)...)
		}, "acknowledged"},
		{"two streams", func(o []obs) []obs { o[len(o)-1].stream = "soak-2"; return o }, "S2 streams"},
		{"stray", func(o []obs) []obs { return append(o, obs{stream: "soak-1", ev: ev("id=4", "update", 7)}) }, "never committed"},
	} {
		p, _, _, _ := verify(x, c.edit(faithful()), acked)
		if !strings.Contains(strings.Join(p, "\n"), c.want) {
			t.Errorf("%s: problems %q, want one saying %q", c.name, p, c.want)
		}
	}
	if m := x.missing(faithful()[1:]); len(m) != 1 || m[0] != changes[0].ev {
		t.Errorf("missing the first change: %v", m)
	}
}
