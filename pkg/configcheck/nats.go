package configcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/router"
	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/sinkstate"
	"github.com/pgs2/pgs2/pkg/units"
)

// jsObject is one JetStream stream, key-value bucket or object store a
// service creates when it is missing.
type jsObject struct {
	kind    string // "stream", "kv", "objects"
	name    string // the stream, bucket or store's name
	by      string // the service that creates it
	purpose string
	// subjects the stream must have exactly (the changes and delivery
	// streams: a stream with others is another source's and is refused).
	subjects []string
}

// stream is the JetStream stream behind the object.
func (o jsObject) stream() string {
	switch o.kind {
	case "kv":
		return "KV_" + o.name
	case "objects":
		return "OBJ_" + o.name
	}
	return o.name
}

func (o jsObject) label() string {
	switch o.kind {
	case "kv":
		return "kv bucket " + o.name
	case "objects":
		return "object store " + o.name
	}
	return "stream " + o.name
}

// jsObjects is everything the three services create in JetStream for
// cfg, in the order they create it.
func jsObjects(cfg *config.Config) []jsObject {
	n, src := cfg.NATS, cfg.Source.Name
	return []jsObject{
		{kind: "stream", name: n.ChangesStream, by: "capture", purpose: "changes of source " + src, subjects: []string{bus.ChangesFilter(src)}},
		{kind: "kv", name: capture.CapturesBucket, by: "capture", purpose: "which capture process is active"},
		{kind: "kv", name: backfill.Bucket, by: "capture", purpose: "backfill jobs"},
		{kind: "objects", name: backfill.StageBucket, by: "capture", purpose: "backfill rows being staged"},
		{kind: "stream", name: n.DeliveryStream, by: "router", purpose: "changes of source " + src + " routed to S2 streams", subjects: []string{bus.DeliveryFilter(src)}},
		{kind: "kv", name: router.RoutersBucket, by: "router", purpose: "which router is active per source"},
		{kind: "kv", name: bus.UnitsBucket, by: "router", purpose: "the S2 streams routed to"},
		{kind: "kv", name: sinkstate.Bucket, by: "router and delivery", purpose: "sink states (paused, disabled)"},
		{kind: "kv", name: delivery.OwnersBucket, by: "delivery", purpose: "which delivery process owns each S2 stream"},
		{kind: "kv", name: delivery.WorkersBucket, by: "delivery", purpose: "live delivery processes"},
		{kind: "kv", name: delivery.FailuresBucket, by: "delivery", purpose: "blocked streams' last S2 errors"},
		{kind: "stream", name: delivery.ParkedStream, by: "delivery", purpose: "parked (failed) messages"},
		{kind: "stream", name: delivery.DeadStream, by: "delivery", purpose: "dead letters"},
		{kind: "stream", name: delivery.AuditStream, by: "delivery", purpose: "the audit of operators' actions"},
	}
}

// checkNATS connects to NATS as the services do and reports, read-only,
// which of the streams and buckets exist and which the services would
// create. An embedded server runs inside capture: without a nats.url
// there is nothing to connect to.
func (r *report) checkNATS(ctx context.Context, cfg *config.Config, db *dbState) {
	n := cfg.NATS
	r.printf("\nnats (read-only)\n")
	objs := jsObjects(cfg)
	if n.Embedded {
		switch fi, err := os.Stat(n.StoreDir); {
		case err == nil && fi.IsDir():
			r.printf("  store_dir:    %s exists\n", n.StoreDir)
		case err == nil:
			r.printf("  store_dir:    %s is NOT A DIRECTORY\n", n.StoreDir)
			r.problem("nats", fmt.Sprintf("nats.store_dir %s is a file, not a directory", n.StoreDir), "point nats.store_dir at a directory")
		case errors.Is(err, os.ErrNotExist):
			r.printf("  store_dir:    %s does not exist: capture would create it\n", n.StoreDir)
		default:
			r.printf("  store_dir:    %s: %v\n", n.StoreDir, err)
		}
		if n.URL == "" {
			r.printf("  server:       embedded in capture, not running here: capture would create, when it starts,\n")
			for _, o := range objs {
				r.printf("    %s (%s, by %s)\n", o.label(), o.purpose, o.by)
			}
			return
		}
	}
	cctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	nc, js, err := service.ConnectJetStream(cctx, n.URL, n, "pgs2ctl-config-check", quiet)
	if err != nil {
		r.printf("  connect:      FAILED (see problems)\n")
		fix := "check nats.url, the server, the network, and the credentials (nats.user with PGS2_NATS_PASSWORD, PGS2_NATS_TOKEN, credentials_file, nkey_file) and nats.tls"
		if n.Embedded {
			r.warn("nats", fmt.Sprintf("cannot connect to %s (%v): the embedded server runs only while capture does", service.RedactURLs(n.URL), err),
				"start capture, then run the check again")
			return
		}
		r.problem("nats", fmt.Sprintf("cannot connect to %s: %v", service.RedactURLs(n.URL), err), fix)
		return
	}
	defer nc.Close()
	r.printf("  connect:      ok, %s (server %s)\n", nc.ConnectedUrlRedacted(), nc.ConnectedServerVersion())
	info, err := js.AccountInfo(cctx)
	if err != nil {
		r.printf("  jetstream:    NOT AVAILABLE\n")
		r.problem("nats", fmt.Sprintf("JetStream is not available on %s: %v", service.RedactURLs(n.URL), err),
			"run nats-server with JetStream enabled (-js, or a jetstream {} block), and give the account JetStream limits")
		return
	}
	r.printf("  jetstream:    ok (%d streams, %s stored, domain %s)\n", info.Streams, units.Bytes(int64(info.Store)), orDash(info.Domain))
	if n.Replicas > 1 {
		if cl := nc.ConnectedClusterName(); cl == "" {
			r.problem("nats", fmt.Sprintf("nats.replicas is %d but the server is not part of a cluster", n.Replicas),
				"set nats.replicas: 1, or connect to a JetStream cluster of at least that many servers")
		}
	}
	var missing []jsObject
	for _, o := range objs {
		s, err := js.Stream(cctx, o.stream())
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			missing = append(missing, o)
			continue
		}
		if err != nil {
			r.problem(o.label(), fmt.Sprintf("cannot look it up: %v", err), "check the account's JetStream permissions ($JS.API.STREAM.INFO.>)")
			continue
		}
		si := s.CachedInfo()
		r.printf("  %s: exists (%d messages, %s, replicas %d)\n", o.label(), si.State.Msgs, units.Bytes(int64(si.State.Bytes)), si.Config.Replicas)
		if o.subjects != nil && !slices.Equal(si.Config.Subjects, o.subjects) {
			r.problem(o.label(), fmt.Sprintf("has subjects %v, not %v: it is another source's (each source needs streams of its own)",
				si.Config.Subjects, o.subjects), fmt.Sprintf("choose another name in the config (nats.changes_stream / nats.delivery_stream) for source %s", cfg.Source.Name))
		}
		if o.name == n.ChangesStream {
			r.changesPosition(cctx, js, cfg, db)
		}
	}
	if len(missing) == 0 {
		r.printf("  nothing to create: every stream and bucket exists\n")
		return
	}
	r.printf("  would be created (%d):\n", len(missing))
	for _, o := range missing {
		r.printf("    %s (%s, by %s)\n", o.label(), o.purpose, o.by)
	}
}

// changesPosition prints how far the changes stream holds the source,
// next to the database's WAL end.
func (r *report) changesPosition(ctx context.Context, js jetstream.JetStream, cfg *config.Config, db *dbState) {
	res, err := bus.ResumeChanges(ctx, js, cfg.NATS.ChangesStream, cfg.Source.Name)
	if err != nil {
		r.problem("stream "+cfg.NATS.ChangesStream, fmt.Sprintf("capture could not resume from it: %v", err), "see docs/operations.md on the changes stream")
		return
	}
	through := "nothing yet"
	if !res.Through.IsZero() {
		through = "commit LSN " + pglogrepl.LSN(res.Through.LSN).String()
	}
	line := "    holds source " + cfg.Source.Name + " through " + through
	if res.Partial {
		line += " (its last round was cut short: capture completes it)"
	}
	if db != nil && db.walLSN != "" {
		line += "; the database's WAL is at " + db.walLSN
		if wal, err := pglogrepl.ParseLSN(db.walLSN); err == nil && !res.Through.IsZero() && uint64(wal) < res.Through.LSN {
			r.problem("stream "+cfg.NATS.ChangesStream, fmt.Sprintf("holds changes up to %s, past the database's WAL end %s: another database, or one restored from a backup",
				pglogrepl.LSN(res.Through.LSN), db.walLSN), "point source.dsn at the database this stream was captured from, or give the source new streams (nats.changes_stream, nats.delivery_stream) and backfill")
		}
	}
	r.printf("%s\n", strings.TrimRight(line, " "))
}
