package ctl

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pglogrepl"
	"github.com/s2-streamstore/s2-sdk-go/s2"
	"github.com/spf13/cobra"

	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/config"
)

const tailLong = `tail prints an S2 stream's records from the first one (seq_num, timestamp,
headers, body pretty-printed when it is JSON) and follows the stream live
until Ctrl-C. Command records (fence, trim) are skipped unless --commands.

The stream is BASIN/STREAM or s2://BASIN/STREAM (as the S2 CLI writes it), or
the sink's stream of --config/--sink.

Where to start (one of them; default the first record):
  --seq N          at seq_num N
  --from-tail      at the tail: only records appended from now on
  --at TIME        at the first change committed in the database at TIME or
                   later: pgs2's records carry their commit time as the S2
                   timestamp. TIME is RFC 3339 (2026-12-07T10:00:00Z), or
                   "2026-12-07 10:00[:05]" or "2026-12-07" in local time, or
                   milliseconds since the epoch
  --ago DURATION   at the first change committed DURATION ago or later (10m, 2h)
  --lsn LSN        at the first change whose commit LSN is LSN or later
                   (0/16B3748, as Postgres writes it), found by binary search on
                   the records' idempotency keys

--json prints one JSON object a line:
  {"seq_num":N,"timestamp":MS,"headers":[[name,value],...],"body":JSON or string}
  (a body that is not UTF-8 comes as "body_base64").

S2 is reached at --endpoint (a local S2-compatible server such as
http://127.0.0.1:8089), else the sink's endpoint, else $S2_ACCOUNT_ENDPOINT and
$S2_BASIN_ENDPOINT, else S2's cloud; the token comes from the variable
--token-env names (default the sink's access_token_env, else S2_ACCESS_TOKEN):
tokens are never taken as flag values.`

type tailOptions struct {
	basin, stream string
	seq           uint64
	fromTail      bool
	at            *time.Time // --at / --ago
	lsn           *uint64    // --lsn
	count         uint64
	noFollow      bool
	json          bool
	commands      bool
	endpoint      string
	tokenEnv      string
}

func (a *app) tailCmd() *cobra.Command {
	var o tailOptions
	var seq, count int64
	var at, lsn, cfgPath, sinkName string
	var agoD time.Duration
	cmd := &cobra.Command{
		Use:   "tail [s2://]BASIN/STREAM",
		Short: "Print an S2 stream's records and follow it; start at a commit time or LSN",
		Long:  tailLong,
		Args:  args(0, 1, "one [s2://]BASIN/STREAM"),
		RunE: func(cmd *cobra.Command, pos []string) error {
			starts := 0
			for _, f := range []string{"seq", "from-tail", "at", "ago", "lsn"} {
				if cmd.Flags().Changed(f) {
					starts++
				}
			}
			switch {
			case starts > 1:
				return usagef("--seq, --from-tail, --at, --ago and --lsn exclude each other: give one")
			case seq < -1:
				return usagef("--seq %d: a seq_num is 0 or more", seq)
			case count < 0:
				return usagef("--count %d: use a positive number (0 = no limit)", count)
			case cmd.Flags().Changed("ago") && agoD <= 0:
				return usagef("--ago %s: give a positive duration such as 10m", agoD)
			}
			o.seq, o.count, o.json = uint64(max(seq, 0)), uint64(count), a.json
			if at != "" {
				t, err := parseTime(at, time.Now())
				if err != nil {
					return usagef("--at %q: %v", at, err)
				}
				o.at = &t
			}
			if cmd.Flags().Changed("ago") {
				t := time.Now().Add(-agoD)
				o.at = &t
			}
			if lsn != "" {
				l, err := pglogrepl.ParseLSN(lsn)
				if err != nil {
					return usagef("--lsn %q: want an LSN as Postgres writes it, such as 0/16B3748", lsn)
				}
				v := uint64(l)
				o.lsn = &v
			}
			return tail(cmd.Context(), o, pos, cfgPath, sinkName, a.stdout, a.getenv)
		},
	}
	f := cmd.Flags()
	f.Int64Var(&seq, "seq", -1, "start at seq_num N")
	f.BoolVar(&o.fromTail, "from-tail", false, "start at the tail: only records appended from now on")
	f.StringVar(&at, "at", "", "start at the first change committed at TIME or later")
	f.DurationVar(&agoD, "ago", 0, "start at the first change committed DURATION ago or later")
	f.StringVar(&lsn, "lsn", "", "start at the first change with commit LSN at LSN or later")
	f.Int64Var(&count, "count", 0, "stop after N records (0 = no limit)")
	f.BoolVar(&o.noFollow, "no-follow", false, "stop at the tail instead of waiting for new records")
	f.BoolVar(&o.commands, "commands", false, "also print command records")
	f.StringVar(&o.endpoint, "endpoint", "", "a local S2-compatible server, http://HOST:PORT")
	f.StringVar(&o.tokenEnv, "token-env", "", "environment variable holding the access token (default the sink's, else S2_ACCESS_TOKEN)")
	f.StringVar(&cfgPath, "config", "", "a pgs2 config file (default $PGS2_CONFIG when --sink is given)")
	f.StringVar(&sinkName, "sink", "", "the sink whose endpoint, token variable and basin/stream to use (default: the config's only sink)")
	return cmd
}

// parseTime reads --at: RFC 3339, a local date and time, a local date,
// or milliseconds since the epoch.
func parseTime(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if ms, err := strconv.ParseInt(s, 10, 64); err == nil && len(s) >= 10 {
		return time.UnixMilli(ms), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	for _, layout := range []string{"2006-01-02 15:04:05.999999999", "2006-01-02T15:04:05.999999999", "2006-01-02 15:04", "2006-01-02T15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, now.Location()); err == nil {
			return t, nil
		}
	}
	return time.Time{}, errors.New(`want RFC 3339 (2026-12-07T10:00:00Z), "2026-12-07 10:00:05" or "2026-12-07" (local time), or milliseconds since the epoch`)
}

// tail runs `pgs2ctl tail` once its flags are read.
func tail(ctx context.Context, o tailOptions, pos []string, cfgPath, sinkName string, stdout io.Writer, getenv func(string) string) error {
	var sink *config.Sink
	var err error
	if cfgPath != "" || sinkName != "" {
		if sink, err = loadSink(cfgPath, sinkName, getenv); err != nil {
			return err
		}
	}
	if len(pos) == 1 {
		name := strings.TrimPrefix(pos[0], "s2://")
		b, s, ok := strings.Cut(name, "/")
		if !ok || b == "" || s == "" {
			return usagef("%q is not BASIN/STREAM or s2://BASIN/STREAM", pos[0])
		}
		o.basin, o.stream = b, s
	} else if sink != nil && sink.Basin != "" && sink.Stream != "" {
		o.basin, o.stream = sink.Basin, sink.Stream
	} else if sink != nil {
		return usagef("sink %q routes to streams by a function: name one as BASIN/STREAM", sink.Name)
	} else {
		return usagef("name the stream to tail as BASIN/STREAM or s2://BASIN/STREAM")
	}

	tg, err := newS2Client(o.endpoint, o.tokenEnv, sink, getenv)
	if err != nil {
		return err
	}
	t := &tailer{o: o, sc: tg.client.Basin(o.basin).Stream(s2.StreamName(o.stream)), where: tg.where,
		tokenEnv: tg.tokenEnv, out: bufio.NewWriter(stdout)}
	return t.run(ctx)
}

func loadSink(path, name string, getenv func(string) string) (*config.Sink, error) {
	if path == "" {
		path = getenv("PGS2_CONFIG")
	}
	if path == "" {
		return nil, fmt.Errorf("%w: --sink needs --config FILE (or PGS2_CONFIG)", errUsage)
	}
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	if name == "" {
		if len(cfg.Sinks) != 1 {
			return nil, fmt.Errorf("%w: %s has %d sinks: choose one with --sink NAME", errUsage, path, len(cfg.Sinks))
		}
		return &cfg.Sinks[0], nil
	}
	var names []string
	for i := range cfg.Sinks {
		if cfg.Sinks[i].Name == name {
			return &cfg.Sinks[i], nil
		}
		names = append(names, cfg.Sinks[i].Name)
	}
	return nil, fmt.Errorf("%w: %s has no sink %q (sinks: %s)", errUsage, path, name, strings.Join(names, ", "))
}

// localToken stands in for a missing token on a local server that does not
// check tokens (the SDK refuses an empty one).
const localToken = "local"

// s2Target is an SDK client and, for messages, where it connects and which
// variable its token came from.
type s2Target struct {
	client   *s2.Client
	where    string
	tokenEnv string
}

// newS2Client builds an SDK client from, in order of precedence, the
// --endpoint flag, the sink's endpoint, the SDK's S2_ACCOUNT_ENDPOINT and
// S2_BASIN_ENDPOINT variables, and S2's cloud.
func newS2Client(endpoint, tokenEnv string, sink *config.Sink, getenv func(string) string) (*s2Target, error) {
	if tokenEnv == "" && sink != nil {
		tokenEnv = sink.AccessTokenEnv
	}
	if tokenEnv == "" {
		tokenEnv = "S2_ACCESS_TOKEN"
	}
	if endpoint == "" && sink != nil {
		endpoint = sink.Endpoint
	}
	opts := &s2.ClientOptions{
		RequestTimeout:    10 * time.Second,
		ConnectionTimeout: 3 * time.Second,
		RetryConfig:       &s2.RetryConfig{MaxAttempts: 3, MinBaseDelay: 100 * time.Millisecond, MaxBaseDelay: time.Second},
	}
	var where string
	local := false
	switch {
	case endpoint != "":
		base, err := directBase(endpoint)
		if err != nil {
			return nil, fmt.Errorf("%w: endpoint %q: %v", errUsage, endpoint, err)
		}
		opts.BaseURL = base
		// A direct endpoint (s2local, s2-lite): basin requests name their
		// basin in the s2-basin header.
		opts.MakeBasinBaseURL = func(string) string { return base }
		where, local = strings.TrimSuffix(base, "/v1"), true
	case getenv("S2_ACCOUNT_ENDPOINT") != "" || getenv("S2_BASIN_ENDPOINT") != "":
		acct, bas := getenv("S2_ACCOUNT_ENDPOINT"), getenv("S2_BASIN_ENDPOINT")
		// The SDK panics on a malformed endpoint: check them first.
		for _, e := range []struct{ name, val string }{{"S2_ACCOUNT_ENDPOINT", acct}, {"S2_BASIN_ENDPOINT", bas}} {
			if e.val == "" {
				continue
			}
			if err := checkEnvEndpoint(e.val); err != nil {
				return nil, fmt.Errorf("%s=%q: %w", e.name, e.val, err)
			}
		}
		if acct != "" {
			opts.BaseURL = acct
			where = acct
		}
		if bas != "" {
			opts.MakeBasinBaseURL = func(basin string) string { return strings.ReplaceAll(bas, "{basin}", basin) }
			where = bas
		}
		local = true
	default:
		where = "S2 (" + s2.DefaultBaseURL + ")"
	}
	token := getenv(tokenEnv)
	if token == "" {
		if !local {
			return nil, fmt.Errorf("no S2 access token: set %s (or --token-env NAME), or point --endpoint at a local server", tokenEnv)
		}
		token = localToken
	}
	return &s2Target{client: s2.New(token, opts), where: where, tokenEnv: tokenEnv}, nil
}

// directBase turns http://host:port[/v1] into the SDK's base URL.
func directBase(endpoint string) (string, error) {
	base := strings.TrimRight(strings.TrimSpace(endpoint), "/")
	scheme, rest, ok := strings.Cut(base, "://")
	if !ok || (scheme != "http" && scheme != "https") {
		return "", errors.New("want http://HOST:PORT or https://HOST:PORT")
	}
	host, _, _ := strings.Cut(rest, "/")
	if host == "" || strings.ContainsAny(host, " {}") {
		return "", errors.New("no host")
	}
	if !strings.HasSuffix(base, "/v1") {
		base += "/v1"
	}
	return base, nil
}

// checkEnvEndpoint accepts what the SDK accepts in S2_*_ENDPOINT: an
// optional http(s) scheme, a host that may hold {basin}, and a path.
func checkEnvEndpoint(v string) error {
	v = strings.ReplaceAll(strings.TrimSpace(v), "{basin}", "basin")
	if scheme, rest, ok := strings.Cut(v, "://"); ok {
		if scheme != "http" && scheme != "https" {
			return fmt.Errorf("unsupported scheme %q: use http or https", scheme)
		}
		v = rest
	}
	host := v
	if i := strings.IndexAny(host, "/?#"); i >= 0 {
		host = host[:i]
	}
	if host == "" || strings.ContainsAny(host, " %") {
		return errors.New("no valid host")
	}
	return nil
}

type tailer struct {
	o        tailOptions
	sc       *s2.StreamClient
	where    string
	tokenEnv string
	out      *bufio.Writer
	n        uint64 // records printed
}

func (t *tailer) name() string { return t.o.basin + "/" + t.o.stream }

func (t *tailer) run(ctx context.Context) error {
	tr, err := t.sc.CheckTail(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return t.explain("check the tail of", err)
	}
	tailSeq := tr.Tail.SeqNum
	start := t.o.seq
	switch {
	case t.o.fromTail:
		start = tailSeq
	case t.o.at != nil:
		if start, err = t.seqAtTime(ctx, *t.o.at, tailSeq); err != nil {
			return err
		}
	case t.o.lsn != nil:
		if start, err = t.seqAtLSN(ctx, *t.o.lsn, tailSeq); err != nil {
			return err
		}
	}
	if start > tailSeq {
		if t.o.at != nil || t.o.lsn != nil {
			start = tailSeq // found past the tail read first: appended since
		} else {
			return fmt.Errorf("--seq %d is beyond the tail of %s (its next seq_num is %d)", start, t.name(), tailSeq)
		}
	}
	if t.o.noFollow {
		err = t.readTo(ctx, start, tailSeq)
	} else {
		err = t.follow(ctx, start)
	}
	if ferr := t.out.Flush(); err == nil && ferr != nil {
		err = fmt.Errorf("write output: %w", ferr)
	}
	return err
}

// seqAtTime is the seq_num of the first record with a timestamp at or
// after at (S2 finds it), or the tail.
func (t *tailer) seqAtTime(ctx context.Context, at time.Time, tailSeq uint64) (uint64, error) {
	ms := uint64(max(at.UnixMilli(), 0))
	one, clamp := uint64(1), true
	b, err := t.sc.Read(ctx, &s2.ReadOptions{Timestamp: &ms, Count: &one, Clamp: &clamp})
	var se *s2.S2Error
	if errors.As(err, &se) && se.Status == http.StatusRequestedRangeNotSatisfiable {
		return tailSeq, nil // nothing at or after the time yet
	}
	if err != nil {
		return 0, t.explain("find the time "+at.Format(time.RFC3339)+" in", err)
	}
	if len(b.Records) == 0 {
		return tailSeq, nil
	}
	return b.Records[0].SeqNum, nil
}

// seqAtLSN is the seq_num of the first change record whose commit LSN
// (from its idempotency key) is lsn or later, or the tail: a binary
// search over seq_num, since delivery appends changes in commit order
// (but for a drained park's records, which come after later ones).
func (t *tailer) seqAtLSN(ctx context.Context, lsn, tailSeq uint64) (uint64, error) {
	lo, hi := uint64(0), tailSeq
	for lo < hi {
		mid := lo + (hi-lo)/2
		seq, pos, ok, err := t.firstChange(ctx, mid, hi)
		if err != nil {
			return 0, err
		}
		if !ok || pos >= lsn {
			hi = mid
		} else {
			lo = seq + 1
		}
	}
	return lo, nil
}

// firstChange finds the first record in [from, end) that carries an
// idempotency key, and its commit LSN.
func (t *tailer) firstChange(ctx context.Context, from, end uint64) (seq, lsn uint64, ok bool, err error) {
	for want := uint64(1); from < end; want = min(2*want, 100) { // one record, unless commands come first
		next := from
		n, clamp := min(end-next, want), true
		b, err := t.sc.Read(ctx, &s2.ReadOptions{SeqNum: &next, Count: &n, Clamp: &clamp})
		if err != nil {
			return 0, 0, false, t.explain("search for the LSN in", err)
		}
		if len(b.Records) == 0 {
			return 0, 0, false, nil
		}
		for _, r := range b.Records {
			if r.SeqNum >= end {
				return 0, 0, false, nil
			}
			if r.IsCommandRecord() {
				continue
			}
			for _, h := range r.Headers {
				if string(h.Name) == "idempotency-key" {
					if p, err := change.ParseKey(string(h.Value)); err == nil {
						return r.SeqNum, p.LSN, true, nil
					}
				}
			}
		}
		from = b.Records[len(b.Records)-1].SeqNum + 1
	}
	return 0, 0, false, nil
}

func (t *tailer) done() bool { return t.o.count > 0 && t.n >= t.o.count }

// readTo prints the records from start up to (not including) end with
// unary reads.
func (t *tailer) readTo(ctx context.Context, start, end uint64) error {
	for next := start; next < end && !t.done(); {
		n := min(end-next, 1000)
		b, err := t.sc.Read(ctx, &s2.ReadOptions{SeqNum: &next, Count: &n})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return t.explain("read", err)
		}
		if len(b.Records) == 0 {
			return nil
		}
		for _, r := range b.Records {
			if r.SeqNum >= end || t.done() {
				return nil
			}
			if err := t.print(r); err != nil {
				return err
			}
		}
		next = b.Records[len(b.Records)-1].SeqNum + 1
	}
	return nil
}

// follow prints records from start as they arrive, until ctx ends or
// --count records are printed.
func (t *tailer) follow(ctx context.Context, start uint64) error {
	sess, err := t.sc.ReadSession(ctx, &s2.ReadOptions{SeqNum: &start})
	if err != nil {
		return t.explain("read", err)
	}
	defer sess.Close()
	for !t.done() && sess.Next() {
		if err := t.print(sess.Record()); err != nil {
			return err
		}
	}
	if err := sess.Err(); err != nil && ctx.Err() == nil && !t.done() {
		return t.explain("read", err)
	}
	return nil
}

// explain turns an SDK error into a message that says what to do.
func (t *tailer) explain(what string, err error) error {
	var se *s2.S2Error
	if errors.As(err, &se) && se.Origin == "sdk" {
		return fmt.Errorf("%s %s: %w", what, t.name(), err)
	}
	if errors.As(err, &se) && se.Origin != "network" && se.Status != 0 {
		switch se.Status {
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("%s refused the access token from $%s (%d %s): set %s to a token allowed to read %s",
				t.where, t.tokenEnv, se.Status, se.Code, t.tokenEnv, t.name())
		case http.StatusNotFound:
			return fmt.Errorf("%s %s: not found at %s (%s: %s); does the basin exist, and has anything been appended yet?",
				what, t.name(), t.where, se.Code, se.Message)
		}
		return fmt.Errorf("%s %s at %s: %w", what, t.name(), t.where, err)
	}
	return fmt.Errorf("cannot reach S2 at %s to %s %s (is the server running? see --endpoint): %w", t.where, what, t.name(), err)
}

type jsonRecord struct {
	SeqNum     uint64          `json:"seq_num"`
	Timestamp  uint64          `json:"timestamp"`
	Headers    [][2]string     `json:"headers"`
	Body       json.RawMessage `json:"body,omitempty"`
	BodyBase64 string          `json:"body_base64,omitempty"`
}

func (t *tailer) print(r s2.SequencedRecord) error {
	if r.IsCommandRecord() && !t.o.commands {
		return nil
	}
	t.n++
	var err error
	if t.o.json {
		err = t.printJSON(r)
	} else {
		err = t.printText(r)
	}
	if err == nil {
		err = t.out.Flush()
	}
	if err != nil {
		return fmt.Errorf("write output: %w", err)
	}
	return nil
}

func (t *tailer) printJSON(r s2.SequencedRecord) error {
	j := jsonRecord{SeqNum: r.SeqNum, Timestamp: r.Timestamp, Headers: make([][2]string, len(r.Headers))}
	for i, h := range r.Headers {
		j.Headers[i] = [2]string{string(h.Name), string(h.Value)}
	}
	switch {
	case len(r.Body) > 0 && json.Valid(r.Body):
		var buf bytes.Buffer
		if err := json.Compact(&buf, r.Body); err != nil {
			return err
		}
		j.Body = buf.Bytes()
	case utf8.Valid(r.Body):
		j.Body, _ = json.Marshal(string(r.Body))
	default:
		j.BodyBase64 = base64.StdEncoding.EncodeToString(r.Body)
	}
	b, err := json.Marshal(j)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(t.out, "%s\n", b)
	return err
}

func (t *tailer) printText(r s2.SequencedRecord) error {
	ts := time.UnixMilli(int64(r.Timestamp)).UTC().Format("2006-01-02T15:04:05.000Z")
	fmt.Fprintf(t.out, "seq_num %d  timestamp %d (%s)\n", r.SeqNum, r.Timestamp, ts)
	if r.IsCommandRecord() {
		fmt.Fprintf(t.out, "  command: %s %q\n\n", r.Headers[0].Value, r.Body)
		return nil
	}
	for _, h := range r.Headers {
		fmt.Fprintf(t.out, "  %s: %s\n", h.Name, h.Value)
	}
	var pretty bytes.Buffer
	switch {
	case len(r.Body) > 0 && json.Indent(&pretty, r.Body, "", "  ") == nil:
		fmt.Fprintf(t.out, "%s\n\n", pretty.Bytes())
	case utf8.Valid(r.Body):
		fmt.Fprintf(t.out, "%s\n\n", r.Body)
	default:
		fmt.Fprintf(t.out, "(%d bytes, not UTF-8) %s\n\n", len(r.Body), base64.StdEncoding.EncodeToString(r.Body))
	}
	return nil
}
