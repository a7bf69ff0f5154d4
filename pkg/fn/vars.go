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

// varsOf reads an expression's variables from its checked AST. It errs on
// the side of reading more: a name it cannot place (a comprehension's
// variable named like one) counts as read.
func varsOf(a *cel.Ast) Vars {
	root := a.NativeRep().Expr()
	// metadata idents that are only the operand of a table field's
	// selection (metadata.table_name, metadata["table_name"]).
	tableOnly := map[int64]bool{}
	celast.PostOrderVisit(root, celast.NewExprVisitor(func(e celast.Expr) {
		switch e.Kind() {
		case celast.SelectKind:
			s := e.AsSelect()
			if op := s.Operand(); op.Kind() == celast.IdentKind && op.AsIdent() == "metadata" && tableFields[s.FieldName()] {
				tableOnly[op.ID()] = true
			}
		case celast.CallKind:
			c := e.AsCall()
			if c.FunctionName() != operators.Index || len(c.Args()) != 2 {
				return
			}
			op, key := c.Args()[0], c.Args()[1]
			if op.Kind() == celast.IdentKind && op.AsIdent() == "metadata" && key.Kind() == celast.LiteralKind {
				if s, ok := key.AsLiteral().(types.String); ok && tableFields[string(s)] {
					tableOnly[op.ID()] = true
				}
			}
		}
	}))
	var v Vars
	celast.PostOrderVisit(root, celast.NewExprVisitor(func(e celast.Expr) {
		if e.Kind() != celast.IdentKind {
			return
		}
		switch e.AsIdent() {
		case "action":
			v |= ReadsAction
		case "record":
			v |= ReadsRecord
		case "changes":
			v |= ReadsChanges
		case "metadata":
			if tableOnly[e.ID()] {
				v |= ReadsTable
			} else {
				v |= ReadsMetadata
			}
		}
	}))
	return v
}

// Needs is what the sink's functions read of a change.
func (f *Functions) Needs() Vars { return f.needs }

// ByTable reports whether the filter's and routing's results depend on
// nothing but the change's table and action (and there is no transform):
// they can be computed once per table and action.
func (f *Functions) ByTable() bool {
	return f.transform == nil && !f.Empty() && f.needs&^(ReadsAction|ReadsTable) == 0
}
