package config_test

import (
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/pgs2/pgs2/pkg/config"
)

// TestReferenceNamesEveryKey: docs/configuration.md names every key the
// config file takes (as `dotted.key`, sinks[] for a sink's), so a key
// added to the code without its reference fails here.
func TestReferenceNamesEveryKey(t *testing.T) {
	doc, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	keys := yamlKeys(reflect.TypeOf(config.Config{}), "")
	if len(keys) < 30 {
		t.Fatalf("only %d keys found: %v", len(keys), keys)
	}
	for _, k := range keys {
		if !strings.Contains(string(doc), "`"+k+"`") {
			t.Errorf("docs/configuration.md does not name `%s`", k)
		}
	}
}

// yamlKeys lists the dotted keys of t's yaml fields.
func yamlKeys(t reflect.Type, prefix string) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		key := prefix + name
		out = append(out, key)
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		switch {
		case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
			out = append(out, yamlKeys(ft.Elem(), key+"[].")...)
		case ft.Kind() == reflect.Struct && ft != reflect.TypeOf(config.Duration(0)):
			out = append(out, yamlKeys(ft, key+".")...)
		}
	}
	if t == reflect.TypeOf(config.InitialBackfill{}) {
		out = append(out, yamlKeys(reflect.TypeOf(config.BackfillTable{}), prefix)...)
	}
	return out
}
