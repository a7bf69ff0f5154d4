package router

import (
	"errors"
	"fmt"
	"regexp"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/metrics"
)

// Sink is one sink as the router sees it.
type Sink struct {
	Name          string
	Tables        []string
	Basin, Stream string
	Functions     *fn.Functions
	// consumer is `,"consumer":{"name":"<sink>"}` spliced into metadata.
	consumer []byte
	// The sink's counters of metrics.Router.Changes, one per outcome
	// (resolved once: a label lookup per change costs).
	routed, filtered, failed, disabled prometheus.Counter
	// memo holds, for functions that read only a change's table and
	// action (fn.ByTable), their outcome per table and action.
	memo memo
}

// outcome is what a sink's functions decided for a change: kept or
// not, where to, or why they failed (the body is the change's).
type outcome struct {
	basin, stream, failure string
	keep                   bool
}

// memo is outcomes by table and action, bounded.
type memo struct {
	mu sync.Mutex
	by map[string]map[string]outcome // table (schema NUL table) → action → outcome
	n  int
}

// maxMemo bounds a sink's memo (tables × actions); past it outcomes are
// computed per change.
const maxMemo = 100_000

func (m *memo) get(table string, action []byte) (outcome, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.by[table][string(action)]
	return o, ok
}

func (m *memo) put(table string, action []byte, o outcome) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.n >= maxMemo {
		return
	}
	if m.by == nil {
		m.by = map[string]map[string]outcome{}
	}
	t := m.by[table]
	if t == nil {
		t = map[string]outcome{}
		m.by[table] = t
	}
	t[string(action)] = o
	m.n++
}

// bind resolves each sink's counters in m.
func (s *Sinks) bind(m *metrics.Router) *Sinks {
	for _, sk := range s.list {
		sk.routed = m.Changes.WithLabelValues(sk.Name, metrics.Routed)
		sk.filtered = m.Changes.WithLabelValues(sk.Name, metrics.Filtered)
		sk.failed = m.Changes.WithLabelValues(sk.Name, metrics.Failed)
		sk.disabled = m.Changes.WithLabelValues(sk.Name, metrics.Disabled)
	}
	return s
}

// Sinks are the configured sinks, indexed by table.
type Sinks struct {
	list    []*Sink
	byTable map[string][]int // "schema.table" → indexes into list, in config order
	// reads is, per table, what its sinks' functions read of a change
	// (but for those decided by table and action alone).
	reads map[string]fn.Reads
}

// CompileSinks compiles every sink's functions. A function that does not
// compile or type-check is an error naming the sink, the expression and the
// position.
func CompileSinks(cfg []config.Sink) (*Sinks, error) {
	s := &Sinks{byTable: map[string][]int{}}
	var errs []error
	for _, c := range cfg {
		f, err := fn.Compile(c.Name, c.Filter, c.Transform, c.Routing)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sk := &Sink{Name: c.Name, Tables: c.Tables, Basin: c.Basin, Stream: c.Stream, Functions: f,
			consumer: []byte(`,"consumer":{"name":"` + c.Name + `"}`)}
		s.list = append(s.list, sk)
		for _, t := range c.Tables {
			s.byTable[t] = append(s.byTable[t], len(s.list)-1)
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%d sink function(s) do not compile: %w", len(errs), errors.Join(errs...))
	}
	s.reads = map[string]fn.Reads{}
	for t, idxs := range s.byTable {
		s.reads[t] = s.readsOf(idxs)
	}
	return s, nil
}

// readsOf is what the functions of the sinks idxs read of a change (those
// decided by table and action alone read nothing per change).
func (s *Sinks) readsOf(idxs []int) fn.Reads {
	var r fn.Reads
	for _, i := range idxs {
		if f := s.list[i].Functions; !f.ByTable() {
			r = r.Union(f.Reads())
		}
	}
	return r
}

var basinRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{6,46}[a-z0-9]$`)

// validTarget checks S2's name rules for a routed basin and stream.
func validTarget(basin, stream string) error {
	if !basinRE.MatchString(basin) {
		return fmt.Errorf("basin %q is not a valid S2 basin name (8-48 of [a-z0-9-], starting and ending with a letter or digit)", basin)
	}
	if stream == "" || len(stream) > 512 || stream == "." || stream == ".." {
		return fmt.Errorf("stream %q is not a valid S2 stream name (1-512 bytes, not . or ..)", stream)
	}
	return nil
}
