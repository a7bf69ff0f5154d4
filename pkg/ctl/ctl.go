// Package ctl is pgs2ctl, the operator's command line: failed messages
// (list, show, retry, ack) through a delivery process's admin API, and
// tailing an S2 stream through the S2 SDK.
package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/pgs2/pgs2/pkg/version"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/pgs2/pgs2/pkg/service"
)

const usage = `usage: pgs2ctl [--admin HOST:PORT] messages <command>
       pgs2ctl [--admin HOST:PORT] backfill <command>
       pgs2ctl tail BASIN/STREAM [--json] [--from-tail | --seq N] [--count N] [--no-follow] [--endpoint URL]

  messages list [--sink S] [--stream S] [--table T] [--json]
  messages show ID [--sink S] [--json]
  messages retry ID [--sink S] [--json] | retry --sink S   (one message, or every one of a sink)
  messages audit [--sink S] [--json]              who acknowledged what, and backfill actions
  messages ack ID --reason TEXT [--operator NAME] [--sink S] [--json]
  tail BASIN/STREAM    print an S2 stream's records and follow it live (pgs2ctl tail -h)
  backfill start --sink S [--table T]... [--where SQL]    read a sink's existing rows into it
  backfill status [ID] [--json] [--watch] | pause ID | resume ID | cancel ID

--admin is a delivery process's --http-addr (default $PGS2_ADMIN_ADDR or 127.0.0.1:9103).
`

// Run runs pgs2ctl with args and returns its exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("pgs2ctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	def := os.Getenv("PGS2_ADMIN_ADDR")
	if def == "" {
		def = "127.0.0.1:9103"
	}
	admin := fs.String("admin", def, "delivery admin address")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *showVersion {
		fmt.Fprintln(stdout, version.String("pgs2ctl"))
		return 0
	}
	rest := fs.Args()
	if len(rest) > 0 && rest[0] == "tail" {
		err := tail(ctx, rest[1:], stdout, os.Getenv)
		switch {
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "pgs2ctl tail: %v\n\n%s", strings.TrimPrefix(err.Error(), "usage: "), tailUsage)
			return 2
		case err != nil:
			fmt.Fprintln(stderr, "pgs2ctl tail:", err)
			return 1
		}
		return 0
	}
	token, err := service.AdminToken()
	if err != nil {
		fmt.Fprintln(stderr, "pgs2ctl:", err)
		return 2
	}
	c := &client{base: "http://" + strings.TrimPrefix(*admin, "http://"), out: stdout, hc: &http.Client{Timeout: 30 * time.Second}, token: token}
	if len(rest) > 0 && rest[0] == "backfill" {
		err := c.backfill(ctx, rest[1:], stderr)
		switch {
		case errors.Is(err, errHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "pgs2ctl backfill: %v\n\n%s", strings.TrimPrefix(err.Error(), "usage: "), backfillUsage)
			return 2
		case err != nil:
			fmt.Fprintln(stderr, "pgs2ctl backfill:", err)
			return 1
		}
		return 0
	}
	if len(rest) < 2 || rest[0] != "messages" {
		fs.Usage()
		return 2
	}
	switch rest[1] {
	case "list":
		err = c.list(ctx, rest[2:], stderr)
	case "show", "retry", "ack":
		err = c.one(ctx, rest[1], rest[2:], stderr)
	case "audit":
		err = c.audit(ctx, rest[2:], stderr)
	default:
		fs.Usage()
		return 2
	}
	if err != nil {
		fmt.Fprintln(stderr, "pgs2ctl:", err)
		return 1
	}
	return 0
}

type client struct {
	base  string
	out   io.Writer
	hc    *http.Client
	token string // the admin API's bearer token
}

func (c *client) call(ctx context.Context, method, path string, body any, v any) error {
	var rd io.Reader
	if m, ok := body.(proto.Message); ok {
		b, _ := protojson.Marshal(m)
		rd = bytes.NewReader(b)
	} else if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("reach the delivery admin API at %s (is delivery running? see --admin): %w", c.base, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s", e.Error)
		}
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(b))
	}
	if m, ok := v.(proto.Message); ok {
		return protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(b, m)
	}
	if v != nil {
		return json.Unmarshal(b, v)
	}
	return nil
}

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

func (c *client) list(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sink := fs.String("sink", "-", "sink (- = all)")
	stream := fs.String("stream", "", "only this S2 stream")
	table := fs.String("table", "", "only this table (schema.table)")
	asJSON := fs.Bool("json", false, "one JSON object a line")
	if err := fs.Parse(args); err != nil {
		return err
	}
	q := url.Values{}
	if *stream != "" {
		q.Set("stream", *stream)
	}
	if *table != "" {
		q.Set("table", *table)
	}
	var resp struct{ Messages []json.RawMessage }
	var err error
	if resp.Messages, err = c.pages(ctx, "/v1/sinks/"+url.PathEscape(*sink)+"/messages", q, "messages"); err != nil {
		return err
	}
	if *asJSON {
		for _, m := range resp.Messages {
			fmt.Fprintln(c.out, string(m))
		}
		return nil
	}
	tw := tabwriter.NewWriter(c.out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSINK\tBASIN/STREAM\tTABLE\tGROUP\tBLOCKED BY\tERROR")
	for _, raw := range resp.Messages {
		var f failed
		_ = json.Unmarshal(raw, &f)
		errText := f.LastError.Message
		if f.LastError.HTTPStatus != 0 {
			errText = fmt.Sprintf("%d %s: %s", f.LastError.HTTPStatus, f.LastError.Code, errText)
		}
		blocked := f.BlockedBy
		if blocked == "" {
			blocked = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%s\t%s\t%s\t%s\n", f.ID, f.Sink, f.Basin, f.Stream, f.Table, f.Group, blocked, errText)
	}
	if len(resp.Messages) == 0 {
		fmt.Fprintln(tw, "(no failed messages)")
	}
	return tw.Flush()
}

func (c *client) one(ctx context.Context, cmd string, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	sink := fs.String("sink", "-", "sink (- = any)")
	reason := fs.String("reason", "", "why the message is dropped (ack)")
	operator := fs.String("operator", os.Getenv("USER"), "who acknowledges (ack)")
	asJSON := fs.Bool("json", false, "print the API's answer as one JSON object")
	// Accept the ID before or after the flags.
	var id string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		id, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if id == "" && fs.NArg() > 0 {
		id = fs.Arg(0)
	}
	all := id == "" && cmd == "retry" && *sink != "-" // every failed message of a sink
	if id == "" && !all {
		return fmt.Errorf("messages %s needs a message ID (see pgs2ctl messages list), or for retry --sink S alone: all of a sink", cmd)
	}
	path := "/v1/sinks/" + url.PathEscape(*sink) + "/messages/" + url.PathEscape(id)
	method, body := "GET", any(nil)
	switch {
	case all:
		method, path = "POST", "/v1/sinks/"+url.PathEscape(*sink)+"/messages/retry"
	case cmd == "retry":
		method, path = "POST", path+"/retry"
	case cmd == "ack":
		if strings.TrimSpace(*reason) == "" {
			return fmt.Errorf("ack drops the message: give --reason")
		}
		method, path, body = "POST", path+"/ack", map[string]string{"reason": *reason, "operator": *operator}
	}
	var answer json.RawMessage
	if err := c.call(ctx, method, path, body, &answer); err != nil {
		return err
	}
	if *asJSON { // the API's answer as it is
		fmt.Fprintln(c.out, string(answer))
		return nil
	}
	switch {
	case all:
		fmt.Fprintf(c.out, "retrying every failed message of sink %s now\n", *sink)
	case cmd == "show":
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
	case cmd == "retry":
		fmt.Fprintf(c.out, "retrying %s now\n", id)
	case cmd == "ack":
		fmt.Fprintf(c.out, "acknowledged %s (dropped; recorded in the audit stream)\n", id)
	}
	return nil
}

// audit prints the audit stream: who did what, oldest first, every page.
func (c *client) audit(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sink := fs.String("sink", "-", "sink (- = all)")
	asJSON := fs.Bool("json", false, "one JSON object a line")
	if err := fs.Parse(args); err != nil {
		return err
	}
	recs, err := c.pages(ctx, "/v1/sinks/"+url.PathEscape(*sink)+"/audit", url.Values{}, "records")
	if err != nil {
		return err
	}
	if *asJSON {
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

// pages GETs path with query q page after page (the API's
// next_page_token) and returns the items of every page's field.
func (c *client) pages(ctx context.Context, path string, q url.Values, field string) ([]json.RawMessage, error) {
	var all []json.RawMessage
	for {
		var page map[string]json.RawMessage
		if err := c.call(ctx, "GET", path+"?"+q.Encode(), nil, &page); err != nil {
			return nil, err
		}
		var items []json.RawMessage
		if raw, ok := page[field]; ok {
			if err := json.Unmarshal(raw, &items); err != nil {
				return nil, fmt.Errorf("the admin API's %s: %w", field, err)
			}
		}
		all = append(all, items...)
		var next string
		if raw, ok := page["next_page_token"]; ok {
			_ = json.Unmarshal(raw, &next)
		}
		if next == "" {
			return all, nil
		}
		q.Set("page_token", next)
	}
}
