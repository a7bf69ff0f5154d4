package ctl_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/seed"
)

// TestExitCodes: help exits 0, usage mistakes 2 and runtime errors 1, on
// every command; flags go before or after the command.
func TestExitCodes(t *testing.T) {
	t.Setenv("PGS2_CONFIG", "")
	t.Setenv("PGS2_ADMIN_TOKEN", "")
	port, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	dead := "127.0.0.1:" + strconv.Itoa(port) // nothing listens
	badConfig := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(badConfig, []byte("source: {name: app}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		code int
		args []string
		want string // in stdout or stderr
	}{
		{0, []string{"-h"}, "Available Commands"},
		{0, []string{"--help"}, "status"},
		{0, []string{"help", "tail"}, "--lsn"},
		{0, []string{"status", "-h"}, "--watch"},
		{0, []string{"messages", "list", "--help"}, "--sink"},
		{0, []string{"sink", "pause", "-h"}, "--reason"},
		{0, []string{"backfill", "start", "-h"}, "--where"},
		{0, []string{"config", "check", "-h"}, "--connect"},
		{0, []string{"tail", "--help"}, "--ago"},
		{0, []string{"completion", "bash"}, "pgs2ctl"},
		{0, []string{"--version"}, "pgs2ctl pgs2 "},

		{2, []string{}, "needs a command"},
		{2, []string{"nope"}, `unknown command "nope"`},
		{2, []string{"stauts"}, "did you mean status"},
		{2, []string{"--bogus"}, "unknown flag"},
		{2, []string{"messages"}, "needs a command"},
		{2, []string{"messages", "nope"}, "unknown command"},
		{2, []string{"messages", "list", "--bogus"}, "unknown flag"},
		{2, []string{"messages", "list", "extra"}, "takes no arguments"},
		{2, []string{"messages", "show"}, "needs a message ID"},
		{2, []string{"messages", "retry"}, "--sink"},
		{2, []string{"messages", "ack", "some-id"}, "--reason"},
		{2, []string{"status", "--interval", "0s"}, "--interval"},
		{2, []string{"status", "--interval", "soon"}, "invalid argument"},
		{2, []string{"sink"}, "needs a command"},
		{2, []string{"sink", "pause", ""}, "an empty argument"},
		{2, []string{"completion"}, "needs a command"},
		{2, []string{"completion", "tcsh"}, "unknown command"},
		{2, []string{"completion", "zsh", "extra"}, "takes no arguments"},
		{2, []string{"sink", "pause"}, "the sink's name"},
		{2, []string{"sink", "pause", "a", "b"}, "takes the sink's name"},
		{2, []string{"sink", "stop", "a"}, "unknown command"},
		{2, []string{"backfill", "start"}, "--sink"},
		{2, []string{"backfill", "start", "--sink", "s", "--where", "id > 1"}, "exactly one --table"},
		{2, []string{"backfill", "pause"}, "backfill's id"},
		{2, []string{"config"}, "needs a command"},
		{2, []string{"config", "check"}, "--config"},
		{2, []string{"tail"}, "BASIN/STREAM"},
		{2, []string{"tail", "b/s", "extra"}, "takes one"},
		{2, []string{"tail", "no-slash"}, "not BASIN/STREAM"},
		{2, []string{"tail", "s2://basin"}, "not BASIN/STREAM"},
		{2, []string{"tail", "b/s", "--at", "yesterday"}, "--at"},
		{2, []string{"tail", "b/s", "--ago", "-5m"}, "--ago"},
		{2, []string{"tail", "b/s", "--lsn", "zz"}, "--lsn"},
		{2, []string{"tail", "b/s", "--at", "2026-01-01", "--seq", "3"}, "exclude each other"},
		{2, []string{"tail", "b/s", "--lsn", "0/1", "--from-tail"}, "exclude each other"},

		{1, []string{"--admin", dead, "status"}, "reach the delivery admin API"},
		{1, []string{"status", "--admin", dead, "--json"}, "reach the delivery admin API"},
		{1, []string{"--json", "--admin", dead, "messages", "list"}, "reach the delivery admin API"},
		{1, []string{"messages", "audit", "--admin", dead}, "reach the delivery admin API"},
		{1, []string{"sink", "pause", "docs", "--admin", dead, "--reason", "x"}, "reach the delivery admin API"},
		{1, []string{"backfill", "status", "--admin", dead}, "reach the delivery admin API"},
		{1, []string{"config", "check", "--config", badConfig}, "problem"},
		{1, []string{"config", "check", "--config", badConfig, "--json"}, `"ok":false`},
	} {
		code, out, errs := run(t, context.Background(), c.args...)
		if code != c.code || !strings.Contains(out+errs, c.want) {
			t.Errorf("pgs2ctl %q: exit %d (want %d), want %q in:\n%s%s", c.args, code, c.code, c.want, out, errs)
		}
	}
}

// TestTailAtCommitTimeAndLSN: --at, --ago and --lsn start at the first
// change committed then or later, for seeded random targets, through
// command records, before the first record and past the last.
func TestTailAtCommitTimeAndLSN(t *testing.T) {
	rng, _ := seed.Rand(t)
	url := s2server(t)
	c := sdk(url)
	ctx := context.Background()
	const history = "history"
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: basin}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Basin(basin).Streams.Create(ctx, s2.CreateStreamArgs{Stream: history}); err != nil {
		t.Fatal(err)
	}
	// n changes, 10 s of commit time and 100–1099 bytes of WAL apart,
	// ending 10 s ago; now and then a command record between them.
	const n = 300
	type rec struct {
		seq, ms, lsn uint64
	}
	var recs []rec
	base := time.Now().Add(-time.Duration(n+1) * 10 * time.Second).UnixMilli()
	lsn := uint64(0x1000000)
	var batch []s2.AppendRecord
	var seqNum uint64
	flush := func() {
		if len(batch) == 0 {
			return
		}
		if _, err := c.Basin(basin).Stream(history).Append(ctx, &s2.AppendInput{Records: batch}); err != nil {
			t.Fatal(err)
		}
		batch = nil
	}
	for i := range n {
		if rng.IntN(10) == 0 { // a command record (trim to 0: a no-op)
			ts := uint64(base + int64(i)*10_000)
			batch = append(batch, s2.AppendRecord{Timestamp: &ts, Headers: []s2.Header{{Name: []byte{}, Value: []byte("trim")}}, Body: make([]byte, 8)})
			seqNum++
		}
		lsn += 100 + uint64(rng.IntN(1000))
		ts := uint64(base + int64(i)*10_000)
		key := change.Position{LSN: lsn, Idx: rng.IntN(3)}.Key()
		batch = append(batch, s2.AppendRecord{Timestamp: &ts, Headers: []s2.Header{s2.NewHeader("idempotency-key", key)},
			Body: fmt.Appendf(nil, `{"i": %d}`, i)})
		recs = append(recs, rec{seq: seqNum, ms: ts, lsn: lsn})
		seqNum++
		if rng.IntN(20) == 0 {
			flush()
		}
	}
	flush()

	// first returns the seq_num of the first change record from tail's
	// start, or -1 when it prints none.
	first := func(args ...string) int64 {
		t.Helper()
		args = append([]string{"tail", "s2://" + basin + "/" + history, "--endpoint", url, "--json", "--no-follow", "--count", "1"}, args...)
		t.Setenv("S2_ACCESS_TOKEN", token)
		code, out, errs := run(t, ctx, args...)
		if code != 0 {
			t.Fatalf("pgs2ctl %q: exit %d: %s", args, code, errs)
		}
		lines := parseLines(t, out)
		if len(lines) == 0 {
			return -1
		}
		return int64(lines[0].SeqNum)
	}
	wantAt := func(ms uint64) int64 {
		for _, r := range recs {
			if r.ms >= ms {
				return int64(r.seq)
			}
		}
		return -1
	}
	wantLSN := func(l uint64) int64 {
		for _, r := range recs {
			if r.lsn >= l {
				return int64(r.seq)
			}
		}
		return -1
	}
	last := recs[len(recs)-1]
	for i := range 12 {
		var ms uint64
		switch i {
		case 0:
			ms = uint64(base - 5000) // before the first
		case 1:
			ms = last.ms + 1 // past the last
		default:
			ms = uint64(base) + uint64(rng.Int64N(int64(last.ms)-base))
		}
		at := time.UnixMilli(int64(ms))
		if got, want := first("--at", strconv.FormatUint(ms, 10)), wantAt(ms); got != want {
			t.Errorf("--at %d (ms): first seq %d, want %d", ms, got, want)
		}
		sec := at.Truncate(time.Second)
		if got, want := first("--at", sec.UTC().Format(time.RFC3339)), wantAt(uint64(sec.UnixMilli())); got != want {
			t.Errorf("--at %s: first seq %d, want %d", sec.UTC().Format(time.RFC3339), got, want)
		}

		var l uint64
		switch i {
		case 0:
			l = 1
		case 1:
			l = last.lsn + 1
		default:
			l = recs[0].lsn + uint64(rng.Int64N(int64(last.lsn-recs[0].lsn)+1))
		}
		if got, want := first("--lsn", pglogrepl.LSN(l).String()), wantLSN(l); got != want {
			t.Errorf("--lsn %s: first seq %d, want %d", pglogrepl.LSN(l), got, want)
		}
	}
	// --ago: half-way through the history (10 s apart, so a second of
	// slack either side still finds the same record).
	mid := recs[n/2]
	d := time.Since(time.UnixMilli(int64(mid.ms) - 5000)).Round(time.Second)
	if got := first("--ago", d.String()); got != int64(mid.seq) {
		t.Errorf("--ago %s: first seq %d, want %d", d, got, mid.seq)
	}
	if got := first("--ago", "100000h"); got != int64(recs[0].seq) {
		t.Errorf("--ago 100000h: first seq %d, want the first change %d", got, recs[0].seq)
	}
}
