package fn

import (
	"github.com/google/cel-go/cel"
	celast "github.com/google/cel-go/common/ast"
	"github.com/google/cel-go/common/operators"
	"github.com/google/cel-go/common/types"
)

// Vars is what of a change a sink's functions read: a set of the
// variables, with metadata's table fields apart from the rest of it.
type Vars uint8

const (
	ReadsAction   Vars = 1 << iota // action
	ReadsRecord                    // record
	ReadsChanges                   // changes
	ReadsTable                     // metadata.table_schema, metadata.table_name
	ReadsMetadata                  // metadata beyond those two fields, or metadata whole
)

// AllVars is every variable.
const AllVars = ReadsAction | ReadsRecord | ReadsChanges | ReadsTable | ReadsMetadata

// tableFields are the metadata fields a change's table determines.
var tableFields = map[string]bool{"table_schema": true, "table_name": true}

// Reads is what functions read of a change: its variables and, of
// record, changes and metadata, the fields when only named fields are
// read (record.qty, metadata["table_name"]).
type Reads struct {
	Vars Vars
	// fields: a variable present reads only these of its fields; absent,
	// the whole of it.
	fields map[string]map[string]bool
}

// Union is what r or o read.
func (r Reads) Union(o Reads) Reads {
	u := Reads{Vars: r.Vars | o.Vars}
	for name, fs := range r.fields {
		os, ok := o.fields[name]
		if !ok && o.Vars&varOf[name] != 0 {
			continue // o reads it whole
		}
		m := map[string]bool{}
		for f := range fs {
			m[f] = true
		}
		for f := range os {
			m[f] = true
		}
		if u.fields == nil {
			u.fields = map[string]map[string]bool{}
		}
		u.fields[name] = m
	}
	for name, os := range o.fields {
		if _, done := u.fields[name]; done || r.Vars&varOf[name] != 0 {
			continue // merged above, or r reads it whole
		}
		if u.fields == nil {
			u.fields = map[string]map[string]bool{}
		}
		u.fields[name] = os
	}
	return u
}

// varOf is the Vars bit of a variable with fields.
var varOf = map[string]Vars{"record": ReadsRecord, "changes": ReadsChanges, "metadata": ReadsTable | ReadsMetadata}

// readsOf reads an expression's variables and fields from its checked
// AST. It errs on the side of reading more: a name it cannot place (a
// comprehension's variable named like one) counts as read whole.
func readsOf(a *cel.Ast) Reads {
	root := a.NativeRep().Expr()
	// Idents that are only the operand of a named field's selection
	// (record.qty, metadata["table_name"]), with the field.
	field := map[int64]string{}
	celast.PostOrderVisit(root, celast.NewExprVisitor(func(e celast.Expr) {
		switch e.Kind() {
		case celast.SelectKind:
			s := e.AsSelect()
			if op := s.Operand(); op.Kind() == celast.IdentKind && varOf[op.AsIdent()] != 0 {
				field[op.ID()] = s.FieldName()
			}
		case celast.CallKind:
			c := e.AsCall()
			if c.FunctionName() != operators.Index || len(c.Args()) != 2 {
				return
			}
			op, key := c.Args()[0], c.Args()[1]
			if op.Kind() == celast.IdentKind && varOf[op.AsIdent()] != 0 && key.Kind() == celast.LiteralKind {
				if s, ok := key.AsLiteral().(types.String); ok {
					field[op.ID()] = string(s)
				}
			}
		}
	}))
	var r Reads
	fields := map[string]map[string]bool{}
	whole := map[string]bool{}
	celast.PostOrderVisit(root, celast.NewExprVisitor(func(e celast.Expr) {
		if e.Kind() != celast.IdentKind {
			return
		}
		name := e.AsIdent()
		switch name {
		case "action":
			r.Vars |= ReadsAction
			return
		case "record", "changes", "metadata":
		default:
			return
		}
		f, ok := field[e.ID()]
		if !ok {
			whole[name] = true
		} else {
			if fields[name] == nil {
				fields[name] = map[string]bool{}
			}
			fields[name][f] = true
		}
		switch {
		case name == "record":
			r.Vars |= ReadsRecord
		case name == "changes":
			r.Vars |= ReadsChanges
		case ok && tableFields[f]:
			r.Vars |= ReadsTable
		default:
			r.Vars |= ReadsMetadata
		}
	}))
	for name, fs := range fields {
		if !whole[name] {
			if r.fields == nil {
				r.fields = map[string]map[string]bool{}
			}
			r.fields[name] = fs
		}
	}
	return r
}

// Needs is what variables the sink's functions read of a change.
func (f *Functions) Needs() Vars { return f.reads.Vars }

// Reads is what the sink's functions read of a change, to the fields.
func (f *Functions) Reads() Reads { return f.reads }

// ByTable reports whether the filter's and routing's results depend on
// nothing but the change's table and action (and there is no transform):
// they can be computed once per table and action.
func (f *Functions) ByTable() bool {
	return f.transform == nil && !f.Empty() && f.reads.Vars&^(ReadsAction|ReadsTable) == 0
}
