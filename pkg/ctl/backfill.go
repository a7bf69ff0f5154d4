package ctl

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

func (a *app) backfillCmd() *cobra.Command {
	var sink, where, id string
	var tables []string
	var chunk, rate uint32
	start := &cobra.Command{
		Use:   "start --sink S",
		Short: "Read the existing rows of a sink's tables (all, or those given) into it as read messages",
		Args:  args(0, 0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if sink == "" {
				return usagef("backfill start needs --sink")
			}
			if where != "" && len(tables) != 1 {
				return usagef("--where needs exactly one --table")
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			req := &adminv1.StartBackfillRequest{Sink: sink, Id: id, ChunkSize: chunk, MaxRowsPerSecond: rate, Operator: operator()}
			for _, t := range tables {
				req.Tables = append(req.Tables, &adminv1.BackfillTable{Table: t, Where: where})
			}
			var b adminv1.Backfill
			if err := c.call(cmd.Context(), "POST", "/v1/backfills", req, &b); err != nil {
				return err
			}
			if a.json {
				return c.printJSON(&b)
			}
			fmt.Fprintf(c.out, "started backfill %s of sink %s; follow it with: pgs2ctl backfill status %s --watch\n", b.Id, b.Sink, b.Id)
			return nil
		},
	}
	start.Flags().StringVar(&sink, "sink", "", "the sink whose messages the rows become (required)")
	start.Flags().StringArrayVar(&tables, "table", nil, "a table of the sink (repeatable; default: all of them)")
	start.Flags().StringVar(&where, "where", "", "SQL condition on the rows of the one --table")
	start.Flags().StringVar(&id, "id", "", "the backfill's id (default: generated)")
	start.Flags().Uint32Var(&chunk, "chunk-size", 0, "rows per chunk (default: source.backfill.chunk_size)")
	start.Flags().Uint32Var(&rate, "max-rows-per-second", 0, "rate limit (default: source.backfill.max_rows_per_second)")

	var statusSink string
	var watch bool
	status := &cobra.Command{
		Use:   "status [ID]",
		Short: "Rows done / estimated, rate and ETA per table (--watch: every second until they end)",
		Args:  args(0, 1, "at most one backfill id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			id := ""
			if len(args) == 1 {
				id = args[0]
			}
			return c.backfillStatus(cmd.Context(), id, statusSink, watch, a.json)
		},
	}
	status.Flags().StringVar(&statusSink, "sink", "", "only this sink's backfills")
	status.Flags().BoolVarP(&watch, "watch", "w", false, "redraw every second until the backfills end")

	action := func(verb, short string) *cobra.Command {
		return &cobra.Command{
			Use:   verb + " ID",
			Short: short,
			Args:  args(1, 1, "the backfill's id (see pgs2ctl backfill status)"),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				var b adminv1.Backfill
				if err := c.call(cmd.Context(), "POST", "/v1/backfills/"+url.PathEscape(args[0])+"/"+verb, &adminv1.BackfillActionRequest{Operator: operator()}, &b); err != nil {
					return err
				}
				if a.json {
					return c.printJSON(&b)
				}
				past := map[string]string{"pause": "paused (after its current chunk)", "resume": "resumed", "cancel": "cancelled"}[verb]
				fmt.Fprintf(c.out, "backfill %s %s\n", b.Id, past)
				return nil
			},
		}
	}
	return group("backfill", "Backfills: start, status, pause, resume, cancel", start, status,
		action("pause", "Pause a backfill after its current chunk"),
		action("resume", "Resume a paused backfill"),
		action("cancel", "Cancel a backfill"))
}

func (c *client) backfillStatus(ctx context.Context, id, sink string, watch, asJSON bool) error {
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
			if err := c.call(ctx, "GET", "/v1/backfills?sink="+url.QueryEscape(sink), nil, &resp); err != nil {
				return err
			}
			list = resp.Backfills
		}
		if asJSON {
			if err := c.printJSON(&adminv1.ListBackfillsResponse{Backfills: list}); err != nil {
				return err
			}
		} else {
			if watch && isTerminal(c.out) {
				fmt.Fprint(c.out, "\033[H\033[2J")
			}
			if err := printBackfills(c.out, list); err != nil {
				return err
			}
		}
		if !watch || !anyActive(list) {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
		if !asJSON && !isTerminal(c.out) {
			fmt.Fprintln(c.out)
		}
	}
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
		return fmt.Sprintf("%s rows", thousands(p.Rows))
	}
	return fmt.Sprintf("%s / ~%s rows", thousands(p.Rows), thousands(p.EstimatedRows))
}

func rate(p *adminv1.BackfillProgress) string {
	if p.RowsPerSecond <= 0 {
		return "-"
	}
	s := fmt.Sprintf("%s rows/s", thousands(int64(p.RowsPerSecond)))
	if p.EtaSeconds > 0 {
		s += "  ETA " + time.Duration(p.EtaSeconds*float64(time.Second)).Round(time.Second).String()
	}
	return s
}

// thousands writes n with thousands separators.
func thousands(n int64) string {
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
