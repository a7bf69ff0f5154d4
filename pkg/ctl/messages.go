package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
)

type failed struct {
	ID             string `json:"id"`
	Sink           string `json:"sink"`
	Basin          string `json:"basin"`
	Stream         string `json:"stream"`
	Table          string `json:"table"`
	Group          string `json:"group"`
	StreamSequence string `json:"stream_sequence"`
	IdempotencyKey string `json:"idempotency_key"`
	Payload        []byte `json:"payload"`
	BlockedBy      string `json:"blocked_by"`
	Attempts       int    `json:"attempts"`
	LastError      struct {
		HTTPStatus int    `json:"http_status"`
		Code       string `json:"code"`
		Message    string `json:"message"`
	} `json:"last_error"`
	FirstFailureTime string `json:"first_failure_time"`
	Headers          []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"headers"`
}

func (a *app) messagesCmd() *cobra.Command {
	var sink, stream, table string
	list := &cobra.Command{
		Use:   "list",
		Short: "List the failed messages (every page), and blocked streams",
		Args:  args(0, 0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			return c.list(cmd.Context(), sink, stream, table, a.json)
		},
	}
	list.Flags().StringVar(&sink, "sink", "-", "only this sink (- = every sink)")
	list.Flags().StringVar(&stream, "stream", "", "only this S2 stream")
	list.Flags().StringVar(&table, "table", "", "only this table (schema.table)")

	one := func(verb, short string) *cobra.Command {
		var sink, reason, op string
		cmd := &cobra.Command{
			Use:   verb + " ID",
			Short: short,
			Args:  args(1, 1, "a message ID (see pgs2ctl messages list)"),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.client()
				if err != nil {
					return err
				}
				return c.one(cmd.Context(), verb, args[0], sink, reason, op, a.json)
			},
		}
		cmd.Flags().StringVar(&sink, "sink", "-", "the message's sink (- = any)")
		if verb == "ack" {
			cmd.Flags().StringVar(&reason, "reason", "", "why the message is dropped (required; recorded in the audit)")
			cmd.Flags().StringVar(&op, "operator", operator(), "who acknowledges (recorded in the audit)")
		}
		return cmd
	}
	show := one("show", "Show a failed message: its payload, headers and last S2 error")
	ack := one("ack", "Acknowledge a failed message: drop it, recorded in the audit with a reason")
	retry := one("retry", "Retry a failed message now, or every one of a sink (--sink S without an ID)")
	retry.Use = "retry [ID]"
	retry.Args = args(0, 1, "one message ID, or none with --sink")
	retry.RunE = func(cmd *cobra.Command, args []string) error {
		sink, _ := cmd.Flags().GetString("sink")
		if len(args) == 0 && sink == "-" {
			return usagef("messages retry needs a message ID (see pgs2ctl messages list), or --sink S alone: every failed message of a sink")
		}
		c, err := a.client()
		if err != nil {
			return err
		}
		id := ""
		if len(args) == 1 {
			id = args[0]
		}
		return c.one(cmd.Context(), "retry", id, sink, "", "", a.json)
	}

	var auditSink string
	audit := &cobra.Command{
		Use:   "audit",
		Short: "Who did what: acknowledgements, retries, sink state changes, backfill actions",
		Args:  args(0, 0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			return c.audit(cmd.Context(), auditSink, a.json)
		},
	}
	audit.Flags().StringVar(&auditSink, "sink", "-", "only this sink (- = every sink)")
	return group("messages", "Failed messages: list, show, retry, ack, audit", list, show, retry, ack, audit)
}

func (c *client) list(ctx context.Context, sink, stream, table string, asJSON bool) error {
	q := url.Values{}
	if stream != "" {
		q.Set("stream", stream)
	}
	if table != "" {
		q.Set("table", table)
	}
	msgs, err := c.pages(ctx, "/v1/sinks/"+url.PathEscape(sink)+"/messages", q, "messages")
	if err != nil {
		return err
	}
	if asJSON {
		for _, m := range msgs {
			fmt.Fprintln(c.out, string(m))
		}
		return nil
	}
	tw := tabwriter.NewWriter(c.out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSINK\tBASIN/STREAM\tTABLE\tGROUP\tBLOCKED BY\tERROR")
	for _, raw := range msgs {
		var f failed
		_ = json.Unmarshal(raw, &f)
		errText := f.LastError.Message
		if f.LastError.HTTPStatus != 0 {
			errText = fmt.Sprintf("%d %s: %s", f.LastError.HTTPStatus, f.LastError.Code, errText)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%s\t%s\t%s\t%s\n", f.ID, f.Sink, f.Basin, f.Stream, f.Table, f.Group, dash(f.BlockedBy), errText)
	}
	if len(msgs) == 0 {
		fmt.Fprintln(tw, "(no failed messages)")
	}
	return tw.Flush()
}

// one shows, retries or acknowledges one message (retry of id "" is every
// message of the sink).
func (c *client) one(ctx context.Context, verb, id, sink, reason, op string, asJSON bool) error {
	all := id == "" && verb == "retry"
	path := "/v1/sinks/" + url.PathEscape(sink) + "/messages/" + url.PathEscape(id)
	method, body := "GET", any(nil)
	switch {
	case all:
		method, path = "POST", "/v1/sinks/"+url.PathEscape(sink)+"/messages/retry"
	case verb == "retry":
		method, path = "POST", path+"/retry"
	case verb == "ack":
		if strings.TrimSpace(reason) == "" {
			return usagef("ack drops the message: give --reason")
		}
		method, path, body = "POST", path+"/ack", map[string]string{"reason": reason, "operator": op}
	}
	var answer json.RawMessage
	if err := c.call(ctx, method, path, body, &answer); err != nil {
		return err
	}
	if asJSON { // the API's answer as it is
		fmt.Fprintln(c.out, string(answer))
		return nil
	}
	switch {
	case all:
		fmt.Fprintf(c.out, "retrying every failed message of sink %s now\n", sink)
	case verb == "show":
		var f failed
		if err := json.Unmarshal(answer, &f); err != nil {
			return fmt.Errorf("the admin API's answer: %w", err)
		}
		fmt.Fprintf(c.out, "id:        %s\nsink:      %s\nstream:    %s/%s\ntable:     %s\ngroup:     %s\nkey:       %s\nseq:       %s\nfailed at: %s\nerror:     %d %s %s\nheaders:\n",
			f.ID, f.Sink, f.Basin, f.Stream, f.Table, f.Group, f.IdempotencyKey, f.StreamSequence, f.FirstFailureTime,
			f.LastError.HTTPStatus, f.LastError.Code, f.LastError.Message)
		for _, h := range f.Headers {
			fmt.Fprintf(c.out, "  %s: %s\n", h.Name, h.Value)
		}
		var pretty bytes.Buffer
		if json.Indent(&pretty, f.Payload, "", "  ") == nil {
			fmt.Fprintf(c.out, "payload:\n%s\n", pretty.String())
		} else {
			fmt.Fprintf(c.out, "payload: %d bytes\n", len(f.Payload))
		}
	case verb == "retry":
		fmt.Fprintf(c.out, "retrying %s now\n", id)
	case verb == "ack":
		fmt.Fprintf(c.out, "acknowledged %s (dropped; recorded in the audit stream)\n", id)
	}
	return nil
}

// audit prints the audit stream: who did what, oldest first, every page.
func (c *client) audit(ctx context.Context, sink string, asJSON bool) error {
	recs, err := c.pages(ctx, "/v1/sinks/"+url.PathEscape(sink)+"/audit", url.Values{}, "records")
	if err != nil {
		return err
	}
	if asJSON {
		for _, r := range recs {
			fmt.Fprintln(c.out, string(r))
		}
		return nil
	}
	tw := tabwriter.NewWriter(c.out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tOPERATOR\tACTION\tID\tREASON")
	for _, raw := range recs {
		var r struct{ Time, Operator, Action, ID, Reason string }
		_ = json.Unmarshal(raw, &r)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Time, r.Operator, r.Action, r.ID, r.Reason)
	}
	if len(recs) == 0 {
		fmt.Fprintln(tw, "(nothing recorded)")
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
