// Package ctl is pgs2ctl, the operator's command line: status and lag,
// sink lifecycle, failed messages and backfills through a delivery
// process's admin API; tailing an S2 stream (from a database commit time
// or LSN) through the S2 SDK; and checking a config file.
//
// Exit codes: 0 success (and -h/--help), 1 a runtime error, 2 a usage
// error (unknown command or flag, missing or bad argument).
package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/version"
)

// errUsage marks a command-line mistake (exit status 2).
var errUsage = errors.New("usage")

// usagef is a usage error (exit status 2).
func usagef(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
}

// app holds the root flags and what the commands share.
type app struct {
	admin  string
	json   bool
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

// client is the admin API client, built when a command needs it (tail
// and config check do not).
func (a *app) client() (*client, error) {
	token, err := service.AdminToken()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	base := a.admin
	if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
		base = "http://" + base
	}
	return &client{base: strings.TrimRight(base, "/"), out: a.stdout, hc: &http.Client{Timeout: 30 * time.Second}, token: token}, nil
}

// Run runs pgs2ctl with args and returns its exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a := &app{stdout: stdout, stderr: stderr, getenv: os.Getenv}
	root := a.root()
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	name := "pgs2ctl"
	if cmd != nil {
		name = cmd.CommandPath()
	}
	if errors.Is(err, errUsage) {
		msg := strings.TrimPrefix(err.Error(), errUsage.Error()+": ")
		fmt.Fprintf(stderr, "%s: %s\nRun '%s --help' for usage.\n", name, msg, name)
		return 2
	}
	fmt.Fprintf(stderr, "%s: %v\n", name, err)
	return 1
}

func (a *app) root() *cobra.Command {
	def := os.Getenv("PGS2_ADMIN_ADDR")
	if def == "" {
		def = "127.0.0.1:9103"
	}
	root := &cobra.Command{
		Use:   "pgs2ctl",
		Short: "Operate pgs2: status, sinks, failed messages, backfills, S2 streams, config",
		Long: `pgs2ctl operates a running pgs2 through a delivery process's admin API
(--admin, its --http-addr; the token from PGS2_ADMIN_TOKEN), reads S2 streams
(tail) and checks config files (config check).

Exit codes: 0 success, 1 a runtime error, 2 a usage error.`,
		Version:       version.String("pgs2ctl"),
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          groupArgs,
		RunE:          groupRun,
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return fmt.Errorf("%w: %v", errUsage, err) })
	root.PersistentFlags().StringVar(&a.admin, "admin", def, "a delivery process's admin address, HOST:PORT (default $PGS2_ADMIN_ADDR or 127.0.0.1:9103)")
	root.PersistentFlags().BoolVar(&a.json, "json", false, "print JSON (the admin API's answers; one object a line for lists)")
	root.AddCommand(a.statusCmd(), a.sinkCmd(), a.messagesCmd(), a.backfillCmd(), a.tailCmd(), a.configCmd())
	// cobra's completion command (it takes its output at creation), with
	// the usage errors of the others.
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		if c.Name() == "completion" {
			c.Args, c.RunE = groupArgs, groupRun
			for _, sh := range c.Commands() {
				sh.Args = args(0, 0, "")
			}
		}
	}
	return root
}

// groupArgs refuses an unknown subcommand of a command that only groups
// others (cobra would print the help and exit 0).
func groupArgs(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2
	}
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return usagef("%s", msg)
}

// groupRun: a group named alone needs one of its commands.
func groupRun(cmd *cobra.Command, _ []string) error {
	var names []string
	for _, c := range cmd.Commands() {
		if c.IsAvailableCommand() && c.Name() != "help" && c.Name() != "completion" {
			names = append(names, c.Name())
		}
	}
	return usagef("%s needs a command: %s", cmd.CommandPath(), strings.Join(names, ", "))
}

// group makes a command that only holds others.
func group(use, short string, cmds ...*cobra.Command) *cobra.Command {
	g := &cobra.Command{Use: use, Short: short, Args: groupArgs, RunE: groupRun}
	g.AddCommand(cmds...)
	return g
}

// args checks the positional arguments: between lo and hi of them, named
// what in the error.
func args(lo, hi int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		for _, a := range args {
			if strings.TrimSpace(a) == "" {
				return usagef("%s: an empty argument", cmd.CommandPath())
			}
		}
		switch {
		case len(args) < lo:
			return usagef("%s needs %s", cmd.CommandPath(), what)
		case len(args) > hi && hi == 0:
			return usagef("%s takes no arguments, got %q", cmd.CommandPath(), args)
		case len(args) > hi:
			return usagef("%s takes %s, got %q", cmd.CommandPath(), what, args)
		}
		return nil
	}
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

func (c *client) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(c.out, string(b))
	return err
}

// operator is who runs the command, for the audit.
func operator() string {
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	return "pgs2ctl"
}
