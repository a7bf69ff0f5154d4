// Package fn compiles and runs a sink's functions — filter, transform and
// routing — written in CEL over a change's action, record, changes and
// metadata. Functions are type-checked at start-up, sandboxed and
// cost-limited; a runtime error is returned, never a panic.
package fn

import (
	"errors"
	"fmt"
	"strings"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/checker"
	celast "github.com/google/cel-go/common/ast"
	"github.com/google/cel-go/common/operators"
	"github.com/google/cel-go/common/overloads"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
)

// Kind names a function's role.
type Kind string

// Function kinds.
const (
	Filter    Kind = "filter"
	Transform Kind = "transform"
	Routing   Kind = "routing"
)

// CostLimit bounds the work of one evaluation (CEL cost units).
const CostLimit = 1_000_000

// CompileError is a function that does not parse or type-check.
type CompileError struct {
	Sink   string
	Kind   Kind
	Expr   string
	Issues string // CEL's report, with line:column and a caret
}

func (e *CompileError) Error() string {
	return fmt.Sprintf("sink %q: %s function does not compile:\n  %s\n%s", e.Sink, e.Kind, e.Expr, indent(e.Issues))
}

func indent(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = "  " + l
	}
	return strings.Join(lines, "\n")
}

// RuntimeError is a function that failed on one change.
type RuntimeError struct {
	Sink string
	Kind Kind
	Err  error
}

func (e *RuntimeError) Error() string {
	return fmt.Sprintf("sink %q: %s function: %v", e.Sink, e.Kind, e.Err)
}

func (e *RuntimeError) Unwrap() error { return e.Err }

// Functions are one sink's compiled functions; nil programs are absent.
type Functions struct {
	sink                       string
	filter, transform, routing cel.Program
	reads                      Reads // what they read of a change
}

var env = mustEnv()

func mustEnv() *cel.Env {
	e, err := cel.NewEnv(
		cel.Variable("action", cel.StringType),
		cel.Variable("record", cel.MapType(cel.StringType, cel.DynType)),
		cel.Variable("changes", cel.DynType),
		cel.Variable("metadata", cel.MapType(cel.StringType, cel.DynType)),
		ext.Strings(), ext.Encoders(), ext.Math(), ext.Lists(),
	)
	if err != nil {
		panic(err)
	}
	return e
}

// Compile compiles a sink's functions; empty expressions are absent.
func Compile(sink, filter, transform, routing string) (*Functions, error) {
	f := &Functions{sink: sink}
	var errs []error
	for _, c := range []struct {
		kind Kind
		expr string
		out  *cel.Program
		want []*cel.Type
	}{
		{Filter, filter, &f.filter, []*cel.Type{cel.BoolType}},
		{Transform, transform, &f.transform, nil},
		{Routing, routing, &f.routing, []*cel.Type{cel.MapType(cel.StringType, cel.DynType), cel.MapType(cel.StringType, cel.StringType)}},
	} {
		if strings.TrimSpace(c.expr) == "" {
			continue
		}
		ast, iss := env.Compile(c.expr)
		if iss.Err() != nil {
			errs = append(errs, &CompileError{Sink: sink, Kind: c.kind, Expr: c.expr, Issues: iss.String()})
			continue
		}
		if c.want != nil && !outputOK(ast.OutputType(), c.want) {
			what := "a bool"
			if c.kind == Routing {
				what = `a map such as {"basin": "...", "stream": "..."}`
			}
			errs = append(errs, &CompileError{Sink: sink, Kind: c.kind, Expr: c.expr,
				Issues: fmt.Sprintf("ERROR: <input>:1:1: the %s function returns %s; it must return %s", c.kind, ast.OutputType(), what)})
			continue
		}
		p, err := env.Program(ast, programOptions(ast)...)
		if err != nil {
			errs = append(errs, &CompileError{Sink: sink, Kind: c.kind, Expr: c.expr, Issues: err.Error()})
			continue
		}
		*c.out = p
		f.reads = f.reads.Union(readsOf(ast))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return f, nil
}

// programOptions are a program's options: the cost limit is tracked at
// run time only where tracked says so. The others cannot exceed it, and
// tracking cost the evaluation of a filter or transform half its time.
func programOptions(ast *cel.Ast) []cel.ProgramOption {
	opts := []cel.ProgramOption{cel.EvalOptions(cel.OptOptimize)}
	if tracked(ast) {
		opts = append(opts, cel.CostLimit(CostLimit))
	}
	return opts
}

// tracked reports whether an expression's cost is tracked at run time:
// unless it calls only CEL's core operators and functions, no macro or
// comprehension, and CEL bounds its cost under the limit. (CEL estimates
// some extension functions from their arguments' count, not their sizes:
// `[record.l, record.l].flatten()`, `join()`; found in review.)
func tracked(ast *cel.Ast) bool {
	core := true
	celast.PreOrderVisit(ast.NativeRep().Expr(), celast.NewExprVisitor(func(e celast.Expr) {
		switch e.Kind() {
		case celast.ComprehensionKind:
			core = false
		case celast.CallKind:
			if !coreFunctions[e.AsCall().FunctionName()] {
				core = false
			}
		}
	}))
	if !core {
		return true
	}
	est, err := env.EstimateCost(ast, unknownSizes{})
	return err != nil || est.Max > CostLimit
}

// coreFunctions are CEL's operators and standard functions whose cost CEL
// estimates from their arguments' sizes.
var coreFunctions = map[string]bool{
	operators.Conditional: true, operators.LogicalAnd: true, operators.LogicalOr: true, operators.LogicalNot: true,
	operators.NotStrictlyFalse: true, operators.Equals: true, operators.NotEquals: true, operators.Less: true,
	operators.LessEquals: true, operators.Greater: true, operators.GreaterEquals: true, operators.Add: true,
	operators.Subtract: true, operators.Multiply: true, operators.Divide: true, operators.Modulo: true,
	operators.Negate: true, operators.Index: true, operators.In: true,
	overloads.Size: true, overloads.TypeConvertString: true, overloads.TypeConvertInt: true,
	overloads.TypeConvertUint: true, overloads.TypeConvertDouble: true, overloads.TypeConvertBool: true,
	overloads.TypeConvertDyn: true, overloads.StartsWith: true, overloads.EndsWith: true, overloads.Contains: true,
}

// unknownSizes knows only what holds for every change: CEL takes the
// largest size for every other value, so a bounded estimate holds for
// every input. The metadata's names are PostgreSQL identifiers (at most
// 63 bytes), and a number or bool converted to a string is at most 32
// characters (so `"s-" + string(record.id % 16)` is bounded too).
type unknownSizes struct{}

func (unknownSizes) EstimateSize(n checker.AstNode) *checker.SizeEstimate {
	if p := n.Path(); len(p) == 2 && p[0] == "metadata" && (p[1] == "table_schema" || p[1] == "table_name" || p[1] == "database_name") {
		return &checker.SizeEstimate{Min: 0, Max: 63}
	}
	return nil
}

func (unknownSizes) EstimateCallCost(_, overload string, _ *checker.AstNode, _ []checker.AstNode) *checker.CallEstimate {
	switch overload {
	case overloads.IntToString, overloads.UintToString, overloads.DoubleToString, overloads.BoolToString:
		return &checker.CallEstimate{CostEstimate: checker.CostEstimate{Min: 1, Max: 1}, ResultSize: &checker.SizeEstimate{Min: 1, Max: 32}}
	}
	return nil
}

func outputOK(got *cel.Type, want []*cel.Type) bool {
	if got.IsExactType(cel.DynType) {
		return true
	}
	for _, w := range want {
		if got.IsAssignableType(w) || w.IsAssignableType(got) {
			return true
		}
	}
	return false
}

// Empty reports whether the sink has no functions: its messages pass
// through untouched.
func (f *Functions) Empty() bool { return f.filter == nil && f.transform == nil && f.routing == nil }

// HasTransform reports whether a transform replaces the body.
func (f *Functions) HasTransform() bool { return f.transform != nil }

// Input is a change as the functions see it.
type Input struct {
	vars map[string]any
}

// ParseInput decodes a message-format body, every variable of it.
// Integers become int64 (so record.id == 7 holds), other numbers float64.
func ParseInput(body []byte) (*Input, error) { return ParseInputReads(body, Reads{Vars: AllVars}) }

// Keep runs the filter: true when the change goes to the sink.
func (f *Functions) Keep(in *Input) (bool, error) {
	if f.filter == nil {
		return true, nil
	}
	out, _, err := f.filter.Eval(in.vars)
	if err != nil {
		return false, &RuntimeError{Sink: f.sink, Kind: Filter, Err: err}
	}
	b, ok := out.(types.Bool)
	if !ok {
		return false, &RuntimeError{Sink: f.sink, Kind: Filter, Err: fmt.Errorf("returned %s, not a bool", out.Type())}
	}
	return bool(b), nil
}

// TransformBody runs the transform and returns the new body as JSON.
func (f *Functions) TransformBody(in *Input) ([]byte, error) {
	out, _, err := f.transform.Eval(in.vars)
	if err != nil {
		return nil, &RuntimeError{Sink: f.sink, Kind: Transform, Err: err}
	}
	b, err := writeJSON(nil, out)
	if err != nil {
		return nil, &RuntimeError{Sink: f.sink, Kind: Transform, Err: err}
	}
	return b, nil
}

// Route runs the routing function; an empty result keeps the sink's own
// basin or stream.
func (f *Functions) Route(in *Input) (basin, stream string, err error) {
	if f.routing == nil {
		return "", "", nil
	}
	out, _, err := f.routing.Eval(in.vars)
	if err != nil {
		return "", "", &RuntimeError{Sink: f.sink, Kind: Routing, Err: err}
	}
	native, err := toNative(out)
	if err != nil {
		return "", "", &RuntimeError{Sink: f.sink, Kind: Routing, Err: err}
	}
	m, ok := native.(map[string]any)
	if !ok {
		return "", "", &RuntimeError{Sink: f.sink, Kind: Routing, Err: fmt.Errorf("returned %T, want a map with basin and/or stream", native)}
	}
	for k, v := range m {
		s, ok := v.(string)
		if !ok {
			return "", "", &RuntimeError{Sink: f.sink, Kind: Routing, Err: fmt.Errorf("%q is %T, want a string", k, v)}
		}
		switch k {
		case "basin":
			basin = s
		case "stream":
			stream = s
		default:
			return "", "", &RuntimeError{Sink: f.sink, Kind: Routing, Err: fmt.Errorf("unknown key %q: return only basin and stream", k)}
		}
	}
	return basin, stream, nil
}
