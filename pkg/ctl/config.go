package ctl

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/pgs2/pgs2/pkg/configcheck"
)

func (a *app) configCmd() *cobra.Command {
	var path string
	var connect bool
	check := &cobra.Command{
		Use:   "check --config FILE",
		Short: "Validate a config file; with --connect also the database and NATS, read-only",
		Long: `check loads and validates a config file as the services do, compiles every
sink's functions and prints what the file configures. With --connect it also
checks the source database (version, wal_level, the role's rights, tables and
their keys, the publication and slot) and NATS (JetStream, the streams and
buckets), read-only, and prints what capture, router and delivery would create.
Nothing is created. It exits 1 when it finds problems, each printed with its
fix. Secrets are never printed.`,
		Args: args(0, 0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if path == "" && a.getenv("PGS2_CONFIG") == "" {
				return usagef("config check needs --config FILE (or PGS2_CONFIG)")
			}
			var out bytes.Buffer
			err := configcheck.Run(cmd.Context(), path, connect, &out)
			var ce *configcheck.CheckError
			if err != nil && !errors.As(err, &ce) {
				return err
			}
			if !a.json {
				if _, werr := a.stdout.Write(out.Bytes()); werr != nil {
					return werr
				}
				if ce != nil {
					return fmt.Errorf("%d problem(s) found", len(ce.Problems))
				}
				return nil
			}
			type problem struct {
				What    string `json:"what"`
				Problem string `json:"problem"`
				Fix     string `json:"fix"`
			}
			answer := struct {
				OK       bool      `json:"ok"`
				Problems []problem `json:"problems"`
				Report   string    `json:"report"`
			}{OK: ce == nil, Problems: []problem{}, Report: out.String()}
			if ce != nil {
				for _, p := range ce.Problems {
					answer.Problems = append(answer.Problems, problem{p.What, p.Problem, p.Fix})
				}
			}
			b, _ := json.Marshal(answer)
			fmt.Fprintln(a.stdout, string(b))
			if ce != nil {
				return fmt.Errorf("%d problem(s) found", len(ce.Problems))
			}
			return nil
		},
	}
	check.Flags().StringVarP(&path, "config", "c", "", "the config file (default $PGS2_CONFIG)")
	check.Flags().BoolVar(&connect, "connect", false, "also check the database and NATS (read-only)")
	return group("config", "Config files: check", check)
}
