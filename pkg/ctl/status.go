package ctl

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/pgs2/pgs2/pkg/units"
	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

func (a *app) statusCmd() *cobra.Command {
	var sink string
	var watch bool
	var interval time.Duration
	cmd := &cobra.Command{
		Use:   "status",
		Short: "How far behind each source, stage, sink and S2 stream is, and who owns what",
		Long: `status gathers every pgs2 process's answer through the admin API:
per source its capture, slot (confirmed LSN, WAL retained, lag) and router;
per stage (JetStream stream) what it holds and what waits; per sink its state,
lag, parked messages, blocked streams and dead letters, and per S2 stream its
owner, lag, last delivered commit time and LSN, and last S2 error.`,
		Args: args(0, 0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if interval <= 0 {
				return usagef("--interval %s: give a positive duration", interval)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			return c.status(cmd.Context(), sink, watch, interval, a.json)
		},
	}
	cmd.Flags().StringVar(&sink, "sink", "", "only this sink")
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "redraw every --interval until interrupted")
	cmd.Flags().DurationVar(&interval, "interval", 2*time.Second, "how often --watch redraws")
	return cmd
}

func (c *client) status(ctx context.Context, sink string, watch bool, interval time.Duration, asJSON bool) error {
	for {
		var st adminv1.GetStatusResponse
		path := "/v1/status"
		if sink != "" {
			path += "?sink=" + url.QueryEscape(sink)
		}
		if err := c.call(ctx, "GET", path, nil, &st); err != nil {
			if watch && ctx.Err() != nil {
				return nil
			}
			return err
		}
		if asJSON {
			if err := c.printJSON(&st); err != nil {
				return err
			}
		} else {
			if watch && isTerminal(c.out) {
				fmt.Fprint(c.out, "\033[H\033[2J")
			}
			if err := printStatus(c.out, &st); err != nil {
				return err
			}
		}
		if !watch {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
		if !asJSON && !isTerminal(c.out) {
			fmt.Fprintln(c.out)
		}
	}
}

// printStatus writes the status as three tables: sources, stages, sinks
// (with a line per S2 stream).
func printStatus(w io.Writer, st *adminv1.GetStatusResponse) error {
	now := time.Now()
	if st.Time != nil {
		now = st.Time.AsTime()
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "pgs2 status at %s\n\n", now.Local().Format("2006-01-02 15:04:05"))
	fmt.Fprintln(tw, "SOURCE\tCAPTURE\tSLOT\tCONFIRMED LSN\tWAL RETAINED\tREPLICATION LAG\tLAST COMMIT\tROUTER")
	for _, s := range st.Sources {
		capture := s.CaptureState
		if s.CaptureHost != "" {
			capture += fmt.Sprintf(" (%s pid %d)", s.CaptureHost, s.CapturePid)
		}
		if len(s.CaptureStandbys) > 0 {
			capture += fmt.Sprintf(", %d standby", len(s.CaptureStandbys))
		}
		lag := "-"
		if s.SampleTime != nil {
			lag = fmt.Sprintf("%s, %s", units.Bytes(s.ReplicationLagBytes), secondsText(s.ReplicationLagSeconds))
		}
		retained := "-"
		if s.SampleTime != nil {
			retained = units.Bytes(s.WalRetainedBytes)
		}
		if s.SlotError != "" {
			lag = "slot error: " + s.SlotError
		}
		router := s.RouterState
		if s.RouterHost != "" {
			router += " (" + s.RouterHost + ")"
		}
		if len(s.DisabledSinks) > 0 {
			router += ", disabled: " + strings.Join(s.DisabledSinks, ", ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Source, capture, dash(s.Slot), dash(s.ConfirmedLsn), retained, lag, ago(now, s.LastCommitTime), router)
	}
	if len(st.Sources) == 0 {
		fmt.Fprintln(tw, "(no source answered: is capture running?)")
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "STAGE\tJETSTREAM STREAM\tSOURCE\tMESSAGES\tSTORED\tPENDING\tLAST STORED")
	for _, s := range st.Stages {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Stage, s.Stream, dash(s.Source), thousands(int64(s.Messages)), units.Bytes(int64(s.Bytes)), thousands(int64(s.Pending)), ago(now, s.LastTime))
	}
	if len(st.Stages) == 0 {
		fmt.Fprintln(tw, "(no stage streams yet)")
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "SINK / S2 STREAM\tSTATE\tLAG\tPENDING\tPARKED (GROUPS/MSGS)\tBLOCKED\tDEAD LETTERS\tLAST COMMIT\tOWNER / LAST ERROR")
	for _, s := range st.Sinks {
		state := "active"
		note := ""
		if s.State != nil && s.State.State != "" {
			state = s.State.State
			if s.State.State != "active" && s.State.ChangedBy != "" {
				note = "by " + s.State.ChangedBy
				if s.State.Reason != "" {
					note += ": " + s.State.Reason
				}
			}
		}
		lag, pending := secondsText(s.LagSeconds), thousands(int64(s.Lag))
		if slices.ContainsFunc(s.Streams, func(x *adminv1.StreamStatus) bool { return x.LagSeconds < 0 }) {
			lag, pending = "-", "-" // not all of it measured
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%d\t%d\t%s\t%s\n", s.Sink, state, lag, pending,
			s.ParkedGroups, s.ParkedMessages, s.BlockedStreams, s.DeadLetters, ago(now, s.LastCommitTime), note)
		for _, x := range s.Streams {
			who := dash(x.OwnerHost)
			if x.LastError != "" {
				who += "; " + x.LastError
				if x.FailingSince != nil {
					who += " (since " + ago(now, x.FailingSince) + ")"
				}
			}
			last := ago(now, x.LastCommitTime)
			if x.LastCommitLsn != "" {
				last += " @ " + x.LastCommitLsn
			}
			lag, pending := secondsText(x.LagSeconds), thousands(int64(x.Pending))
			if x.LagSeconds < 0 { // not measured
				lag, pending = "-", "-"
			}
			fmt.Fprintf(tw, "  %s/%s\t%s\t%s\t%s\t%d/%d\t\t%d\t%s\t%s\n", x.Basin, x.Stream, x.State, lag, pending,
				x.ParkedGroups, x.ParkedMessages, x.DeadLetters, last, who)
		}
	}
	if len(st.Sinks) == 0 {
		fmt.Fprintln(tw, "(no sinks)")
	}
	return tw.Flush()
}

// ago is how long before now t was ("-" when unset).
func ago(now time.Time, t *timestamppb.Timestamp) string {
	if t == nil || (t.Seconds == 0 && t.Nanos == 0) {
		return "-"
	}
	d := now.Sub(t.AsTime())
	if d < 0 {
		d = 0
	}
	return durationText(d) + " ago"
}

func secondsText(s float64) string {
	return durationText(time.Duration(s * float64(time.Second)))
}

func durationText(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func (a *app) sinkCmd() *cobra.Command {
	verb := func(action, short string) *cobra.Command {
		var reason, op string
		cmd := &cobra.Command{
			Use:   action + " SINK",
			Short: short,
			Args:  args(1, 1, "the sink's name"),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				var st adminv1.SinkState
				req := &adminv1.SinkStateRequest{Sink: args[0], Operator: op, Reason: reason}
				if err := c.call(cmd.Context(), "POST", "/v1/sinks/"+url.PathEscape(args[0])+"/"+action, req, &st); err != nil {
					return err
				}
				if a.json {
					return c.printJSON(&st)
				}
				fmt.Fprintf(c.out, "sink %s is %s (set by %s; recorded in the audit)\n", st.Sink, st.State, dash(st.ChangedBy))
				return nil
			},
		}
		cmd.Flags().StringVar(&reason, "reason", "", "why (recorded in the audit)")
		cmd.Flags().StringVar(&op, "operator", operator(), "who (recorded in the audit; an operator's own token names them instead)")
		return cmd
	}
	return group("sink", "Sink lifecycle: pause, resume, disable, enable",
		verb("pause", "Stop appending to the sink's S2 streams; JetStream keeps its changes, resume continues in order"),
		verb("resume", "Resume a paused sink"),
		verb("disable", "Pause the sink and stop routing to it: the router produces nothing for it until enabled"),
		verb("enable", "Enable a disabled (or paused) sink"),
	)
}
