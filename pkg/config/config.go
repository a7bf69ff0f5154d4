// Package config reads and validates the one YAML file that configures every
// pgs2 service. It is the only package that reads files or the environment
// for configuration.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is the whole file.
type Config struct {
	Source    Source    `yaml:"source"`
	NATS      NATS      `yaml:"nats"`
	Sinks     []Sink    `yaml:"sinks"`
	Telemetry Telemetry `yaml:"telemetry"`

	problems []error // found while applying defaults (table names)
}

// Source is the PostgreSQL database to capture.
type Source struct {
	// Name identifies the source in subjects; [A-Za-z0-9_-]+.
	Name string `yaml:"name"`
	// DSN is a postgres:// URL or key=value string. The password may come from
	// PGS2_SOURCE_PASSWORD instead.
	DSN         string   `yaml:"dsn"`
	Slot        string   `yaml:"slot"`
	Publication string   `yaml:"publication"`
	Tables      []string `yaml:"tables"`
	// Backfill are the defaults of this source's backfills.
	Backfill SourceBackfill `yaml:"backfill"`
	// Password is filled from PGS2_SOURCE_PASSWORD by Load; never serialised.
	Password string `yaml:"-"`
}

// SourceBackfill bounds what a backfill asks of the database.
type SourceBackfill struct {
	// ChunkSize is the most rows one chunk's query reads (default 1000):
	// chunks start at 100 rows and grow while they read under 2 MiB.
	ChunkSize int `yaml:"chunk_size"`
	// StatementTimeout bounds one chunk's query (default 30s).
	StatementTimeout Duration `yaml:"statement_timeout"`
	// MaxRowsPerSecond limits each backfill's reads (default 0: no limit).
	MaxRowsPerSecond int `yaml:"max_rows_per_second"`
}

// Backfill defaults and limits.
const (
	DefaultBackfillChunkSize        = 1000
	DefaultBackfillStatementTimeout = 30 * time.Second
	MaxBackfillChunkSize            = 100_000
)

// InitialBackfill is a sink's backfill when it first starts: every table
// of the sink (`initial_backfill: true`), or a list of tables, each a name
// or a `{table, where}` with a SQL condition on its rows.
type InitialBackfill struct {
	All    bool
	Tables []BackfillTable
}

// BackfillTable is one table of a backfill, with an optional SQL filter.
type BackfillTable struct {
	Table string `yaml:"table"`
	Where string `yaml:"where"`
}

// UnmarshalYAML reads true/false, or a list of table names and
// {table, where} mappings.
func (b *InitialBackfill) UnmarshalYAML(n *yaml.Node) error {
	bad := func(format string, a ...any) error {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: initial_backfill: ", n.Line) + fmt.Sprintf(format, a...)}}
	}
	switch n.Kind {
	case yaml.ScalarNode:
		if err := n.Decode(&b.All); err != nil {
			return bad("%q is neither true, false nor a list of tables", n.Value)
		}
		return nil
	case yaml.SequenceNode:
		for _, item := range n.Content {
			switch item.Kind {
			case yaml.ScalarNode:
				b.Tables = append(b.Tables, BackfillTable{Table: item.Value})
			case yaml.MappingNode:
				var t BackfillTable
				for i := 0; i+1 < len(item.Content); i += 2 {
					k, v := item.Content[i], item.Content[i+1]
					if v.Kind != yaml.ScalarNode {
						return bad("line %d: %s must be a string", v.Line, k.Value)
					}
					switch k.Value {
					case "table":
						t.Table = v.Value
					case "where":
						t.Where = v.Value
					default:
						return bad("line %d: unknown key %q (a table takes table and where)", k.Line, k.Value)
					}
				}
				b.Tables = append(b.Tables, t)
			default:
				return bad("line %d: a table is a name or {table: schema.name, where: SQL}", item.Line)
			}
		}
		return nil
	}
	return bad("want true, or a list of tables (names or {table, where})")
}

// NATS is the JetStream connection and stream settings.
type NATS struct {
	URL      string `yaml:"url"`
	Embedded bool   `yaml:"embedded"`
	StoreDir string `yaml:"store_dir"`
	Replicas int    `yaml:"replicas"`
	// Partitions is how many subjects per table groups are hashed into.
	Partitions int `yaml:"partitions"`
	// ChangesStream names the stream of this source's changes (default PGS2_CHANGES).
	ChangesStream string `yaml:"changes_stream"`
	// DeliveryStream names the stream of this source's routed changes,
	// between router and delivery (default PGS2_DELIVERY).
	DeliveryStream string `yaml:"delivery_stream"`
	// DuplicateWindow of the changes stream (default 10m).
	DuplicateWindow Duration `yaml:"duplicate_window"`
	// ChangesMaxAge is how long the changes stream keeps a change (default 0:
	// until deleted). A change older than this is gone even if the router has
	// not read it, so set it well above the longest router outage you allow.
	ChangesMaxAge Duration `yaml:"changes_max_age"`
	// SyncInterval of an embedded server's file store (default 1s); "always" is not offered.
	SyncInterval Duration `yaml:"sync_interval"`
	// User authenticates with a password from PGS2_NATS_PASSWORD (or the
	// file PGS2_NATS_PASSWORD_FILE names); a token comes from
	// PGS2_NATS_TOKEN (or PGS2_NATS_TOKEN_FILE) without a user.
	User string `yaml:"user"`
	// CredentialsFile is a .creds file (user JWT and NKey seed).
	CredentialsFile string `yaml:"credentials_file"`
	// NKeyFile is a file holding an NKey seed (SU…).
	NKeyFile string `yaml:"nkey_file"`
	// TLS to the server.
	TLS NATSTLS `yaml:"tls"`
	// Password and Token are filled from the environment by Load; never
	// serialised.
	Password string `yaml:"-"`
	Token    string `yaml:"-"`
}

// NATSTLS is the TLS of the NATS connection.
type NATSTLS struct {
	// CAFile verifies the server (default: the system's roots).
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are a client certificate, for servers that
	// verify clients.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName is the name the server's certificate must hold (default:
	// the URL's host).
	ServerName string `yaml:"server_name"`
}

// Enabled reports whether any TLS setting is given.
func (t NATSTLS) Enabled() bool {
	return t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" || t.ServerName != ""
}

// Sink is one S2 destination.
type Sink struct {
	Name           string              `yaml:"name"`
	Tables         []string            `yaml:"tables"`
	Basin          string              `yaml:"basin"`
	Stream         string              `yaml:"stream"`
	AccessTokenEnv string              `yaml:"access_token_env"`
	Endpoint       string              `yaml:"endpoint"`
	GroupColumns   map[string][]string `yaml:"group_columns"`
	Filter         string              `yaml:"filter"`
	Transform      string              `yaml:"transform"`
	Routing        string              `yaml:"routing"`
	CreateStream   bool                `yaml:"create_stream"`
	// Status is the sink's state when the config is applied: active (the
	// default), paused (delivery stops appending; its changes wait in
	// JetStream) or disabled (the router stops producing for it too).
	// pgs2ctl sink pause|resume|disable|enable changes it at run time; the
	// latest of the two wins (see docs/operations.md).
	Status string `yaml:"status"`
	// InitialBackfill, when set, backfills the sink's tables (or the ones
	// listed) once, when the sink first starts.
	InitialBackfill *InitialBackfill `yaml:"initial_backfill"`
	Batch           Batch            `yaml:"batch"`
	Retry           Retry            `yaml:"retry"`
}

// Batch limits one S2 append.
type Batch struct {
	MaxRecords int      `yaml:"max_records"`
	MaxBytes   int      `yaml:"max_bytes"`
	Linger     Duration `yaml:"linger"`
}

// Retry is the back-off of failed deliveries.
type Retry struct {
	Initial     Duration `yaml:"initial"`
	Max         Duration `yaml:"max"`
	MaxAttempts int      `yaml:"max_attempts"`
}

// Telemetry configures OpenTelemetry export.
type Telemetry struct {
	OTLPEndpoint string `yaml:"otlp_endpoint"`
}

// Duration is a time.Duration written as "5ms", "1s", "5m" in YAML.
type Duration time.Duration

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: want a duration such as 5ms, 1s or 5m", n.Line)}}
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a duration; write e.g. 5ms, 1s or 5m", n.Line, s)}}
	}
	*d = Duration(v)
	return nil
}

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Defaults.
const (
	DefaultPartitions      = 64
	DefaultChangesStream   = "PGS2_CHANGES"
	DefaultDeliveryStream  = "PGS2_DELIVERY"
	DefaultDuplicateWindow = 10 * time.Minute
	DefaultSyncInterval    = time.Second
	MaxPartitions          = 4096
)

// Load reads the file at path (or PGS2_CONFIG when path is empty), applies
// defaults and the environment, and validates it.
func Load(path string) (*Config, error) {
	if path == "" {
		path = os.Getenv("PGS2_CONFIG")
	}
	if path == "" {
		return nil, errors.New("config: no config file: pass --config FILE or set PGS2_CONFIG")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: read %s: %w", path, err)
	}
	c, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes YAML, applies defaults and the environment, and validates.
func Parse(b []byte) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			return nil, fmt.Errorf("invalid config:\n  %s", strings.Join(keyNames(te.Errors), "\n  "))
		}
		return nil, fmt.Errorf("malformed YAML: %s", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	c.Source.Password = os.Getenv("PGS2_SOURCE_PASSWORD")
	var err error
	if c.NATS.Password, err = Secret("PGS2_NATS_PASSWORD"); err == nil {
		c.NATS.Token, err = Secret("PGS2_NATS_TOKEN")
	}
	if err != nil {
		return nil, err
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Secret is the value of the environment variable name, or the first line
// of the file name_FILE names ("" when neither is set).
func Secret(name string) (string, error) {
	if v := os.Getenv(name); v != "" {
		return v, nil
	}
	path := os.Getenv(name + "_FILE")
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s_FILE: %w", name, err)
	}
	v, _, _ := strings.Cut(string(b), "\n")
	if v = strings.TrimSpace(v); v == "" {
		return "", fmt.Errorf("%s_FILE: %s is empty", name, path)
	}
	return v, nil
}

func (c *Config) applyDefaults() {
	if c.Source.Slot == "" {
		c.Source.Slot = "pgs2"
	}
	if c.Source.Publication == "" {
		c.Source.Publication = "pgs2"
	}
	table := func(key string, t string) string {
		n, err := ParseTable(t)
		if err != nil {
			c.problems = append(c.problems, fmt.Errorf("%s: %w", key, err))
			return t
		}
		return n
	}
	for i, t := range c.Source.Tables {
		c.Source.Tables[i] = table(fmt.Sprintf("source.tables[%d]", i), t)
	}
	if c.Source.Backfill.ChunkSize == 0 {
		c.Source.Backfill.ChunkSize = DefaultBackfillChunkSize
	}
	if c.Source.Backfill.StatementTimeout == 0 {
		c.Source.Backfill.StatementTimeout = Duration(DefaultBackfillStatementTimeout)
	}
	n := &c.NATS
	if n.Replicas == 0 {
		n.Replicas = 1
	}
	if n.Partitions == 0 {
		n.Partitions = DefaultPartitions
	}
	if n.ChangesStream == "" {
		n.ChangesStream = DefaultChangesStream
	}
	if n.DeliveryStream == "" {
		n.DeliveryStream = DefaultDeliveryStream
	}
	if n.DuplicateWindow == 0 {
		n.DuplicateWindow = Duration(DefaultDuplicateWindow)
	}
	if n.SyncInterval == 0 {
		n.SyncInterval = Duration(DefaultSyncInterval)
	}
	for i := range c.Sinks {
		s := &c.Sinks[i]
		for j, t := range s.Tables {
			s.Tables[j] = table(fmt.Sprintf("sinks[%d].tables[%d]", i, j), t)
		}
		if len(s.GroupColumns) > 0 {
			gc := make(map[string][]string, len(s.GroupColumns))
			for t, cols := range s.GroupColumns {
				key := fmt.Sprintf("sinks[%d].group_columns", i)
				names := make([]string, len(cols))
				for k, col := range cols {
					n, err := ParseIdentifier(col)
					if err != nil {
						c.problems = append(c.problems, fmt.Errorf("%s.%s: %w", key, t, err))
						n = col
					}
					names[k] = n
				}
				gc[table(key, t)] = names
			}
			s.GroupColumns = gc
		}
		if ib := s.InitialBackfill; ib != nil {
			for j := range ib.Tables {
				if ib.Tables[j].Table != "" {
					ib.Tables[j].Table = table(fmt.Sprintf("sinks[%d].initial_backfill[%d]", i, j), ib.Tables[j].Table)
				}
			}
		}
		if s.AccessTokenEnv == "" {
			s.AccessTokenEnv = "S2_ACCESS_TOKEN"
		}
		if s.Batch.MaxRecords == 0 {
			s.Batch.MaxRecords = 1000
		}
		if s.Batch.MaxBytes == 0 {
			s.Batch.MaxBytes = 1 << 20
		}
		if s.Batch.Linger == 0 {
			s.Batch.Linger = Duration(5 * time.Millisecond)
		}
		if s.Retry.Initial == 0 {
			s.Retry.Initial = Duration(time.Second)
		}
		if s.Retry.Max == 0 {
			s.Retry.Max = Duration(5 * time.Minute)
		}
	}
}

// sections names the Go types of the file's sections as a reader knows them.
var sections = strings.NewReplacer(
	"in type config.Config", "at the top level (source, nats, sinks, telemetry)",
	"in type config.SourceBackfill", "under source.backfill", // before its prefix
	"in type config.Source", "under source",
	"in type config.NATSTLS", "under nats.tls", // before its prefix
	"in type config.NATS", "under nats",
	"in type config.Sink", "under a sink",
	"in type config.Batch", "under a sink's batch",
	"in type config.Retry", "under a sink's retry",
	"in type config.Telemetry", "under telemetry",
)

func keyNames(errs []string) []string {
	out := make([]string, len(errs))
	for i, e := range errs {
		out[i] = sections.Replace(e)
	}
	return out
}

// ParseTable reads a table name as Postgres does (psql's \d, pg_dump -t):
// `users`, `sales.orders`, `"Mixed Case"."Weird.Table"`. Unquoted names
// fold to lower case, quoted ones are kept as written ("" is a quote), and
// a bare name is in schema public. It returns the name pgs2 uses for the
// table everywhere: schema and table as Postgres stores them, joined by a
// dot (the table's part may hold dots; a schema's may not).
func ParseTable(s string) (string, error) {
	parts, err := ParseIdentifiers(s)
	if err != nil {
		return "", err
	}
	switch len(parts) {
	case 1:
		parts = []string{"public", parts[0]}
	case 2:
	default:
		return "", fmt.Errorf("%q has %d dotted parts: write table or schema.table (a name with a dot needs double quotes, e.g. \"my.table\")", s, len(parts))
	}
	if strings.Contains(parts[0], ".") {
		return "", fmt.Errorf("%q: schema %q holds a dot, which pgs2 does not support; rename the schema", s, parts[0])
	}
	return parts[0] + "." + parts[1], nil
}

// ParseIdentifier reads one identifier (a column) as Postgres does:
// unquoted folds to lower case, "Quoted" is kept.
func ParseIdentifier(s string) (string, error) {
	parts, err := ParseIdentifiers(s)
	if err != nil {
		return "", err
	}
	if len(parts) != 1 {
		return "", fmt.Errorf("%q is not one name (a name with a dot needs double quotes)", s)
	}
	return parts[0], nil
}

// ParseIdentifiers splits a dotted name into its identifiers.
func ParseIdentifiers(s string) ([]string, error) {
	var parts []string
	rest := strings.TrimSpace(s)
	if rest == "" {
		return nil, errors.New("empty name")
	}
	for {
		var part string
		if strings.HasPrefix(rest, `"`) {
			var b strings.Builder
			i := 1
			for ; ; i++ {
				if i >= len(rest) {
					return nil, fmt.Errorf("%q: a double quote is not closed", s)
				}
				if rest[i] == '"' {
					if i+1 < len(rest) && rest[i+1] == '"' {
						b.WriteByte('"')
						i++
						continue
					}
					break
				}
				b.WriteByte(rest[i])
			}
			part, rest = b.String(), rest[i+1:]
			if part == "" {
				return nil, fmt.Errorf("%q: an empty quoted name", s)
			}
		} else {
			end := strings.IndexByte(rest, '.')
			if end < 0 {
				end = len(rest)
			}
			raw := strings.TrimSpace(rest[:end])
			if raw == "" {
				return nil, fmt.Errorf("%q: an empty name between dots", s)
			}
			if !unquotedRE.MatchString(raw) {
				return nil, fmt.Errorf("%q: %q is not a plain name (letters, digits, _ and $, not first a digit); put a name with other characters in double quotes", s, raw)
			}
			part, rest = asciiLower(raw), rest[end:]
		}
		parts = append(parts, part)
		rest = strings.TrimSpace(rest)
		if rest == "" {
			return parts, nil
		}
		if rest[0] != '.' {
			return nil, fmt.Errorf("%q: unexpected %q after %q", s, rest, part)
		}
		rest = strings.TrimSpace(rest[1:])
	}
}

var unquotedRE = regexp.MustCompile(`^[A-Za-z_\x{80}-\x{10FFFF}][A-Za-z0-9_$\x{80}-\x{10FFFF}]*$`)

// QualifyTable returns ParseTable's name for t, or t itself when it is
// not a valid name (Parse reports those).
func QualifyTable(t string) string {
	if n, err := ParseTable(t); err == nil {
		return n
	}
	return t
}

// SplitTable splits a table's name (ParseTable's) into schema and table.
func SplitTable(t string) (schema, table string) {
	schema, table, _ = strings.Cut(t, ".")
	return schema, table
}

var (
	tokenRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	slotRE  = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)
	identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_$]{0,62}$`)
	basinRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{6,46}[a-z0-9]$`)
)

// Validate checks every key and returns all problems at once, each naming
// the key and how to fix it.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	s := c.Source
	switch {
	case s.Name == "":
		bad("source.name", "missing; set a short name such as `app` ([A-Za-z0-9_-])")
	case !tokenRE.MatchString(s.Name):
		bad("source.name", "%q may only hold letters, digits, '_' and '-'", s.Name)
	}
	if s.DSN == "" {
		bad("source.dsn", "missing; set e.g. postgres://replicator@localhost:5432/app")
	} else if strings.Contains(s.DSN, "://") {
		if _, err := url.Parse(s.DSN); err != nil {
			bad("source.dsn", "not a valid URL (check quoting and special characters in the password; or put the password in PGS2_SOURCE_PASSWORD)")
		}
	}
	if !slotRE.MatchString(s.Slot) {
		bad("source.slot", "%q is not a valid replication slot name: use 1-63 of [a-z0-9_]", s.Slot)
	}
	if !identRE.MatchString(s.Publication) {
		bad("source.publication", "%q is not a plain identifier: use letters, digits and '_'", s.Publication)
	}
	if len(s.Tables) == 0 {
		bad("source.tables", "empty; list the tables to capture, e.g. [public.users]")
	}
	errs = append(errs, c.problems...)
	seen := map[string]bool{}
	for i, t := range s.Tables {
		if seen[t] {
			bad(fmt.Sprintf("source.tables[%d]", i), "%q is listed twice", t)
		}
		seen[t] = true
	}
	if b := s.Backfill; b.ChunkSize < 1 || b.ChunkSize > MaxBackfillChunkSize {
		bad("source.backfill.chunk_size", "%d is out of range: use 1..%d (default %d)", b.ChunkSize, MaxBackfillChunkSize, DefaultBackfillChunkSize)
	}
	if b := s.Backfill; b.StatementTimeout.D() < 100*time.Millisecond {
		bad("source.backfill.statement_timeout", "%s is too short: use at least 100ms (default %s)", b.StatementTimeout.D(), DefaultBackfillStatementTimeout)
	}
	if s.Backfill.MaxRowsPerSecond < 0 {
		bad("source.backfill.max_rows_per_second", "must be 0 (no limit) or positive")
	}

	n := c.NATS
	if n.Embedded {
		if n.StoreDir == "" {
			bad("nats.store_dir", "required with nats.embedded: true; set a directory for JetStream's files")
		}
	} else if n.URL == "" {
		bad("nats.url", "missing; set e.g. nats://127.0.0.1:4222, or nats.embedded: true with nats.store_dir")
	}
	auths := 0
	for _, set := range []bool{n.User != "", n.Token != "", n.CredentialsFile != "", n.NKeyFile != ""} {
		if set {
			auths++
		}
	}
	switch {
	case auths > 1:
		bad("nats", "give one way to authenticate: user (with PGS2_NATS_PASSWORD), a token (PGS2_NATS_TOKEN), credentials_file or nkey_file")
	case n.User != "" && n.Password == "":
		bad("nats.user", "needs its password in PGS2_NATS_PASSWORD (or a file named by PGS2_NATS_PASSWORD_FILE)")
	case n.Embedded && (auths > 0 || n.TLS.Enabled()):
		bad("nats.embedded", "the embedded server takes no authentication or TLS settings; connect to a nats-server (nats.url) for those")
	}
	if (n.TLS.CertFile == "") != (n.TLS.KeyFile == "") {
		bad("nats.tls", "cert_file and key_file go together (a client certificate and its key)")
	}
	for key, path := range map[string]string{"nats.credentials_file": n.CredentialsFile, "nats.nkey_file": n.NKeyFile,
		"nats.tls.ca_file": n.TLS.CAFile, "nats.tls.cert_file": n.TLS.CertFile, "nats.tls.key_file": n.TLS.KeyFile} {
		if path == "" {
			continue
		}
		if _, err := os.Stat(path); err != nil {
			bad(key, "cannot read %s: %v", path, errors.Unwrap(err))
		}
	}
	if n.Replicas < 1 || n.Replicas > 5 {
		bad("nats.replicas", "%d is out of range: use 1, 3 or 5", n.Replicas)
	}
	if n.Partitions < 1 || n.Partitions > MaxPartitions {
		bad("nats.partitions", "%d is out of range: use 1..%d (default %d)", n.Partitions, MaxPartitions, DefaultPartitions)
	}
	if !tokenRE.MatchString(n.ChangesStream) {
		bad("nats.changes_stream", "%q is not a valid stream name: use letters, digits, '_' and '-'", n.ChangesStream)
	}
	if !tokenRE.MatchString(n.DeliveryStream) {
		bad("nats.delivery_stream", "%q is not a valid stream name: use letters, digits, '_' and '-'", n.DeliveryStream)
	} else if n.DeliveryStream == n.ChangesStream {
		bad("nats.delivery_stream", "%q is also nats.changes_stream: give the two streams different names", n.DeliveryStream)
	}
	if n.ChangesMaxAge < 0 || (n.ChangesMaxAge > 0 && n.ChangesMaxAge < n.DuplicateWindow) {
		bad("nats.changes_max_age", "%s must be 0 (keep until deleted) or at least nats.duplicate_window", n.ChangesMaxAge.D())
	}
	if n.DuplicateWindow.D() < time.Second {
		bad("nats.duplicate_window", "%s is too short: use at least 1s (default 10m)", n.DuplicateWindow.D())
	}

	names := map[string]bool{}
	for i, sk := range c.Sinks {
		key := fmt.Sprintf("sinks[%d]", i)
		switch {
		case sk.Name == "":
			bad(key+".name", "missing; give the sink a name such as users-to-s2")
		case !tokenRE.MatchString(sk.Name):
			bad(key+".name", "%q may only hold letters, digits, '_' and '-'", sk.Name)
		case names[sk.Name]:
			bad(key+".name", "%q is used by two sinks; names must be unique", sk.Name)
		}
		names[sk.Name] = true
		switch sk.Status {
		case "", "active", "paused", "disabled":
		default:
			bad(key+".status", "%q is not a sink status: write active, paused or disabled", sk.Status)
		}
		if len(sk.Tables) == 0 {
			bad(key+".tables", "empty; list the source tables this sink receives")
		}
		for j, t := range sk.Tables {
			if !seen[t] {
				bad(fmt.Sprintf("%s.tables[%d]", key, j), "%q is not in source.tables; add it there", t)
			}
		}
		if sk.Basin == "" && sk.Routing == "" {
			bad(key+".basin", "missing; set the S2 basin (or a routing function)")
		} else if sk.Basin != "" && !basinRE.MatchString(sk.Basin) {
			bad(key+".basin", "%q is not a valid basin name: 8-48 of [a-z0-9-], starting and ending with a letter or digit", sk.Basin)
		}
		if sk.Stream == "" && sk.Routing == "" {
			bad(key+".stream", "missing; set the S2 stream (or a routing function)")
		} else if len(sk.Stream) > 512 || sk.Stream == "." || sk.Stream == ".." {
			bad(key+".stream", "%q is not a valid stream name: 1-512 bytes, not . or ..", sk.Stream)
		}
		sinkTables := map[string]bool{}
		for _, t := range sk.Tables {
			sinkTables[t] = true
		}
		if ib := sk.InitialBackfill; ib != nil {
			if (ib.All || len(ib.Tables) > 0) && len(sk.Name) > 56 {
				bad(key+".name", "%q is longer than 56 bytes, too long to name its initial backfill (initial-<name>); shorten it", sk.Name)
			}
			listed := map[string]bool{}
			for j, bt := range ib.Tables {
				k := fmt.Sprintf("%s.initial_backfill[%d]", key, j)
				switch {
				case bt.Table == "":
					bad(k, "names no table; write a name, or {table: schema.name, where: SQL}")
				case !sinkTables[bt.Table]:
					bad(k, "%q is not in this sink's tables; add it there", bt.Table)
				case listed[bt.Table]:
					bad(k, "%q is listed twice; give one entry (combine the where conditions)", bt.Table)
				}
				listed[bt.Table] = true
				if err := CheckWhere(bt.Where); err != nil {
					bad(k+".where", "%v: write one SQL condition, e.g. created_at > '2026-01-01'", err)
				}
			}
		}
		for t, cols := range sk.GroupColumns {
			if !sinkTables[t] {
				bad(key+".group_columns", "table %q is not in this sink's tables", t)
			}
			if len(cols) == 0 {
				bad(key+".group_columns."+t, "empty; list at least one column or remove the entry")
			}
		}
		if sk.Batch.MaxRecords < 1 || sk.Batch.MaxRecords > 1000 {
			bad(key+".batch.max_records", "%d is out of range: S2 takes 1..1000 records per append", sk.Batch.MaxRecords)
		}
		if sk.Batch.MaxBytes < 1 || sk.Batch.MaxBytes > 1<<20 {
			bad(key+".batch.max_bytes", "%d is out of range: S2 takes at most 1048576 bytes per append", sk.Batch.MaxBytes)
		}
		if sk.Retry.Max.D() < sk.Retry.Initial.D() {
			bad(key+".retry.max", "%s is below retry.initial %s", sk.Retry.Max.D(), sk.Retry.Initial.D())
		}
		if sk.Retry.MaxAttempts < 0 {
			bad(key+".retry.max_attempts", "must be 0 (retry forever) or positive")
		}
	}
	if _, err := c.GroupColumns(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// GroupColumns returns, per table, the columns that define a change's group
// when a sink overrides the primary key. Capture partitions by these columns,
// so all sinks that set group_columns for one table must agree.
func (c *Config) GroupColumns() (map[string][]string, error) {
	out := map[string][]string{}
	owner := map[string]string{}
	for _, sk := range c.Sinks {
		for t, cols := range sk.GroupColumns {
			if prev, ok := out[t]; ok && strings.Join(prev, ",") != strings.Join(cols, ",") {
				return nil, fmt.Errorf("sinks.group_columns: sinks %q and %q group table %s differently (%v vs %v); "+
					"capture partitions each table one way, so give them the same columns", owner[t], sk.Name, t, prev, cols)
			}
			out[t] = cols
			owner[t] = sk.Name
		}
	}
	return out, nil
}

// asciiLower folds A-Z only, as Postgres folds unquoted names in UTF-8.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// ErrBadWhere means a backfill's where is not one SQL condition.
var ErrBadWhere = errors.New("invalid where")

// CheckWhere refuses a where that could end the condition it is put in
// (`WHERE (<where>) AND …`): a ';', a comment, a parenthesis closed
// before it opens or left open, or a quote left open. It does not make
// the condition safe to run — the admin API that takes one is for
// operators — but it keeps it one condition.
func CheckWhere(where string) error {
	if strings.ContainsRune(where, '\\') { // E'' strings would end where this check does not see
		return fmt.Errorf("%w %q: backslashes are not supported", ErrBadWhere, where)
	}
	depth := 0
	for i := 0; i < len(where); i++ {
		switch c := where[i]; c {
		case '\'', '"':
			j := strings.IndexByte(where[i+1:], c)
			if j < 0 {
				return fmt.Errorf("%w %q: a %c quote is not closed", ErrBadWhere, where, c)
			}
			i += 1 + j
		case ';':
			return fmt.Errorf("%w %q: it holds ';'; give one SQL condition", ErrBadWhere, where)
		case '-', '/':
			if i+1 < len(where) && (c == '-' && where[i+1] == '-' || c == '/' && where[i+1] == '*') {
				return fmt.Errorf("%w %q: it holds a comment", ErrBadWhere, where)
			}
		case '(':
			depth++
		case ')':
			if depth--; depth < 0 {
				return fmt.Errorf("%w %q: a ')' closes more than it opened", ErrBadWhere, where)
			}
		case '$': // in a name (a$b) it is part of it; else a dollar quote or a parameter
			if i == 0 || !identChar(where[i-1]) {
				return fmt.Errorf("%w %q: dollar quotes and parameters are not supported; use '...' quotes", ErrBadWhere, where)
			}
		}
	}
	if depth != 0 {
		return fmt.Errorf("%w %q: a '(' is not closed", ErrBadWhere, where)
	}
	return nil
}

func identChar(c byte) bool {
	return c == '_' || c == '$' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80
}
