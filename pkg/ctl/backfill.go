package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

const backfillUsage = `usage: pgs2ctl backfill <command>

  backfill start --sink S [--table T]... [--where SQL] [--id ID] [--chunk-size N] [--max-rows-per-second N] [--json]
        read the existing rows of the sink's tables (all, or those given) into the sink as read messages;
        --where applies to the one --table given
  backfill status [ID] [--sink S] [--json] [--watch]
        rows done / estimated, rate and ETA per table (--watch: every second until they end)
  backfill pause ID | resume ID | cancel ID [--json]
`

// errHelp: -h or --help was asked for (exit status 0).
var errHelp = errors.New("help requested")

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// backfill runs `pgs2ctl backfill ...`; errUsage wraps usage errors.
func (c *client) backfill(ctx context.Context, args []string, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: backfill needs a command", errUsage)
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet("backfill "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, backfillUsage) }
	asJSON := fs.Bool("json", false, "print the API's JSON")
	switch cmd {
	case "start":
		sink := fs.String("sink", "", "the sink whose messages the rows become")
		var tables stringList
		fs.Var(&tables, "table", "a table of the sink (repeatable; default: all of them)")
		where := fs.String("where", "", "SQL condition on the rows of the one --table")
		id := fs.String("id", "", "the backfill's id (default: generated)")
		chunk := fs.Uint("chunk-size", 0, "rows per chunk (default: source.backfill.chunk_size)")
		rate := fs.Uint("max-rows-per-second", 0, "rate limit (default: source.backfill.max_rows_per_second)")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		if *sink == "" {
			return fmt.Errorf("%w: backfill start needs --sink", errUsage)
		}
		if *where != "" && len(tables) != 1 {
			return fmt.Errorf("%w: --where needs exactly one --table", errUsage)
		}
		req := &adminv1.StartBackfillRequest{Sink: *sink, Id: *id, ChunkSize: uint32(*chunk), MaxRowsPerSecond: uint32(*rate), Operator: os.Getenv("USER")}
		for _, t := range tables {
			req.Tables = append(req.Tables, &adminv1.BackfillTable{Table: t, Where: *where})
		}
		var b adminv1.Backfill
		if err := c.call(ctx, "POST", "/v1/backfills", req, &b); err != nil {
			return err
		}
		if *asJSON {
			return c.printJSON(&b)
		}
		fmt.Fprintf(c.out, "started backfill %s of sink %s; follow it with: pgs2ctl backfill status %s --watch\n", b.Id, b.Sink, b.Id)
		return nil
	case "status":
		sink := fs.String("sink", "", "only this sink's backfills")
		watch := fs.Bool("watch", false, "redraw every second until the backfills end")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		id := fs.Arg(0)
		for {
			var list []*adminv1.Backfill
			if id != "" {
				var b adminv1.Backfill
				if err := c.call(ctx, "GET", "/v1/backfills/"+url.PathEscape(id), nil, &b); err != nil {
					return err
				}
				list = []*adminv1.Backfill{&b}
			} else {
				var resp adminv1.ListBackfillsResponse
				if err := c.call(ctx, "GET", "/v1/backfills?sink="+url.QueryEscape(*sink), nil, &resp); err != nil {
					return err
				}
				list = resp.Backfills
			}
			if *asJSON {
				if err := c.printJSON(&adminv1.ListBackfillsResponse{Backfills: list}); err != nil {
					return err
				}
			} else {
				if *watch && isTerminal(c.out) {
					fmt.Fprint(c.out, "\033[H\033[2J")
				}
				if err := printBackfills(c.out, list); err != nil {
					return err
				}
			}
			if !*watch || !anyActive(list) {
				return nil
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
			if !*asJSON && !isTerminal(c.out) {
				fmt.Fprintln(c.out)
			}
		}
	case "pause", "resume", "cancel":
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: backfill %s needs the backfill's id (see pgs2ctl backfill status)", errUsage, cmd)
		}
		var b adminv1.Backfill
		if err := c.call(ctx, "POST", "/v1/backfills/"+url.PathEscape(fs.Arg(0))+"/"+cmd, &adminv1.BackfillActionRequest{Operator: os.Getenv("USER")}, &b); err != nil {
			return err
		}
		if *asJSON {
			return c.printJSON(&b)
		}
		past := map[string]string{"pause": "paused (after its current chunk)", "resume": "resumed", "cancel": "cancelled"}[cmd]
		fmt.Fprintf(c.out, "backfill %s %s\n", b.Id, past)
		return nil
	}
	return fmt.Errorf("%w: unknown backfill command %q", errUsage, cmd)
}

// parseFlags parses flags before or after the positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return errHelp
			}
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	return fs.Parse(append([]string{"--"}, pos...))
}

func (c *client) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(c.out, string(b))
	return err
}

func anyActive(list []*adminv1.Backfill) bool {
	for _, b := range list {
		if b.State == "running" || b.State == "paused" {
			return true
		}
	}
	return false
}

// printBackfills writes one block per backfill: a line for it and one per
// table with a progress bar.
func printBackfills(w io.Writer, list []*adminv1.Backfill) error {
	if len(list) == 0 {
		_, err := fmt.Fprintln(w, "(no backfills; start one with pgs2ctl backfill start --sink S)")
		return err
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	for _, b := range list {
		by := ""
		if b.CreatedBy != "" {
			by = " by " + b.CreatedBy
		}
		fmt.Fprintf(tw, "%s\tsink %s\t%s\tstarted %s%s\n", b.Id, b.Sink, b.State, b.CreateTime.AsTime().Local().Format("2006-01-02 15:04:05"), by)
		if len(b.Progress) == 0 {
			fmt.Fprintf(tw, "  (no table started yet: is capture running?)\n")
		}
		for _, p := range b.Progress {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", p.Source, p.Table, bar(p), rows(p), rate(p), p.State)
			if p.Error != "" {
				fmt.Fprintf(tw, "  \t\terror: %s\n", p.Error)
			}
		}
	}
	return tw.Flush()
}

const barWidth = 24

// bar draws the table's share done; an estimate below the rows read
// (the planner's statistics are old) shows as nearly full until done.
func bar(p *adminv1.BackfillProgress) string {
	frac := 0.0
	switch {
	case p.State == "done":
		frac = 1
	case p.EstimatedRows > 0:
		frac = min(float64(p.Rows)/float64(p.EstimatedRows), 0.99)
	}
	n := int(frac * barWidth)
	return fmt.Sprintf("[%s%s] %3d%%", strings.Repeat("#", n), strings.Repeat("-", barWidth-n), int(frac*100))
}

func rows(p *adminv1.BackfillProgress) string {
	if p.EstimatedRows <= 0 {
		return fmt.Sprintf("%s rows", group(p.Rows))
	}
	return fmt.Sprintf("%s / ~%s rows", group(p.Rows), group(p.EstimatedRows))
}

func rate(p *adminv1.BackfillProgress) string {
	if p.RowsPerSecond <= 0 {
		return "-"
	}
	s := fmt.Sprintf("%s rows/s", group(int64(p.RowsPerSecond)))
	if p.EtaSeconds > 0 {
		s += "  ETA " + time.Duration(p.EtaSeconds*float64(time.Second)).Round(time.Second).String()
	}
	return s
}

// group writes n with thousands separators.
func group(n int64) string {
	s := fmt.Sprint(n)
	if n < 0 {
		return s
	}
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
