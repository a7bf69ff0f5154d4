package s2local

import (
	"bytes"
	"encoding/json"
	"reflect"
)

// Stream and basin configuration, following S2's three layers
// (common/src/config.rs): an optional layer (unset fields fall back), the
// resolved config a stream has (stream layer, then the basin's default
// stream config, then S2's defaults), and PATCH-style reconfiguration where
// an absent field is left alone and null resets it.

const (
	storageStandard = "standard"
	storageExpress  = "express"

	tsClientPrefer  = "client-prefer"
	tsClientRequire = "client-require"
	tsArrival       = "arrival"

	defaultRetentionAge = 7 * 24 * 60 * 60 // seconds
)

// streamConfig is a stream's resolved configuration.
type streamConfig struct {
	StorageClass      string
	RetentionInfinite bool
	RetentionAge      uint64 // seconds, when not infinite
	TSMode            string
	TSUncapped        bool
	DOEMinAgeSecs     uint64
}

// optStreamConfig is one optional layer of stream configuration.
type optStreamConfig struct {
	StorageClass  *string
	Retention     *retention
	TSMode        *string
	TSUncapped    *bool
	DOEMinAgeSecs *uint64
}

type retention struct {
	Infinite bool
	Age      uint64
}

// basinConfig is a basin's configuration.
type basinConfig struct {
	DefaultStream  optStreamConfig
	CreateOnAppend bool
	CreateOnRead   bool
}

func (o optStreamConfig) isZero() bool { return reflect.DeepEqual(o, optStreamConfig{}) }

// resolve merges the stream layer o over the basin's defaults and S2's.
func (o optStreamConfig) resolve(basin optStreamConfig) streamConfig {
	c := streamConfig{StorageClass: storageExpress, RetentionAge: defaultRetentionAge, TSMode: tsClientPrefer}
	for _, l := range []optStreamConfig{basin, o} {
		if l.StorageClass != nil {
			c.StorageClass = *l.StorageClass
		}
		if l.Retention != nil {
			c.RetentionInfinite, c.RetentionAge = l.Retention.Infinite, l.Retention.Age
		}
		if l.TSMode != nil {
			c.TSMode = *l.TSMode
		}
		if l.TSUncapped != nil {
			c.TSUncapped = *l.TSUncapped
		}
		if l.DOEMinAgeSecs != nil {
			c.DOEMinAgeSecs = *l.DOEMinAgeSecs
		}
	}
	return c
}

// opt turns a resolved config into a layer with every field set.
func (c streamConfig) opt() optStreamConfig {
	sc, mode, unc, doe := c.StorageClass, c.TSMode, c.TSUncapped, c.DOEMinAgeSecs
	return optStreamConfig{StorageClass: &sc, Retention: &retention{Infinite: c.RetentionInfinite, Age: c.RetentionAge},
		TSMode: &mode, TSUncapped: &unc, DOEMinAgeSecs: &doe}
}

func retentionJSON(r retention) any {
	if r.Infinite {
		return map[string]any{"infinite": map[string]any{}}
	}
	return map[string]any{"age": r.Age}
}

// apiJSON is the resolved config as S2 returns it (every field set).
func (c streamConfig) apiJSON() map[string]any {
	return map[string]any{
		"storage_class":    c.StorageClass,
		"retention_policy": retentionJSON(retention{Infinite: c.RetentionInfinite, Age: c.RetentionAge}),
		"timestamping":     map[string]any{"mode": c.TSMode, "uncapped": c.TSUncapped},
		"delete_on_empty":  map[string]any{"min_age_secs": c.DOEMinAgeSecs},
	}
}

// apiJSON is an optional layer as S2 returns it (unset fields null), or nil
// when nothing is set.
func (o optStreamConfig) apiJSON() any {
	if o.isZero() {
		return nil
	}
	m := map[string]any{"storage_class": nil, "retention_policy": nil, "timestamping": nil, "delete_on_empty": nil}
	if o.StorageClass != nil {
		m["storage_class"] = *o.StorageClass
	}
	if o.Retention != nil {
		m["retention_policy"] = retentionJSON(*o.Retention)
	}
	if o.TSMode != nil || o.TSUncapped != nil {
		ts := map[string]any{"mode": nil, "uncapped": nil}
		if o.TSMode != nil {
			ts["mode"] = *o.TSMode
		}
		if o.TSUncapped != nil {
			ts["uncapped"] = *o.TSUncapped
		}
		m["timestamping"] = ts
	}
	if o.DOEMinAgeSecs != nil {
		m["delete_on_empty"] = map[string]any{"min_age_secs": *o.DOEMinAgeSecs}
	}
	return m
}

func (b basinConfig) apiJSON() map[string]any {
	return map[string]any{
		"default_stream_config":   b.DefaultStream.apiJSON(),
		"stream_cipher":           nil,
		"create_stream_on_append": b.CreateOnAppend,
		"create_stream_on_read":   b.CreateOnRead,
	}
}

// --- parsing ---------------------------------------------------------------

func isNull(raw json.RawMessage) bool { return len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" }

// fields decodes a JSON object (or null → nil map) keeping presence.
func fields(raw json.RawMessage, what string) (map[string]json.RawMessage, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, errorf(codeBadJSON, "%s: %v", what, err)
	}
	return m, nil
}

func decodeField(raw json.RawMessage, v any, what string) *apiError {
	if err := json.Unmarshal(raw, v); err != nil {
		return errorf(codeBadJSON, "%s: %v", what, err)
	}
	return nil
}

func parseStorageClass(raw json.RawMessage) (*string, *apiError) {
	var s string
	if e := decodeField(raw, &s, "storage_class"); e != nil {
		return nil, e
	}
	if s != storageStandard && s != storageExpress {
		return nil, errorf(codeBadJSON, "storage_class: unknown variant %q, expected %q or %q", s, storageStandard, storageExpress)
	}
	return &s, nil
}

func parseTSMode(raw json.RawMessage) (*string, *apiError) {
	var s string
	if e := decodeField(raw, &s, "timestamping.mode"); e != nil {
		return nil, e
	}
	switch s {
	case tsClientPrefer, tsClientRequire, tsArrival:
		return &s, nil
	}
	return nil, errorf(codeBadJSON, "timestamping.mode: unknown variant %q, expected %q, %q or %q", s, tsClientPrefer, tsClientRequire, tsArrival)
}

func parseRetention(raw json.RawMessage) (*retention, *apiError) {
	m, e := fields(raw, "retention_policy")
	if e != nil {
		return nil, e
	}
	age, hasAge := m["age"]
	inf, hasInf := m["infinite"]
	switch {
	case hasAge && !hasInf:
		var a uint64
		if e := decodeField(age, &a, "retention_policy.age"); e != nil {
			return nil, e
		}
		if a == 0 {
			return nil, errorf(codeInvalid, "age must be greater than 0 seconds")
		}
		return &retention{Age: a}, nil
	case hasInf && !hasAge:
		if _, e := fields(inf, "retention_policy.infinite"); e != nil {
			return nil, e
		}
		return &retention{Infinite: true}, nil
	}
	return nil, errorf(codeBadJSON, "retention_policy: expected exactly one of \"age\" or \"infinite\"")
}

func parseBool(raw json.RawMessage, what string) (*bool, *apiError) {
	var b bool
	if e := decodeField(raw, &b, what); e != nil {
		return nil, e
	}
	return &b, nil
}

func parseUint(raw json.RawMessage, what string) (*uint64, *apiError) {
	var u uint64
	if e := decodeField(raw, &u, what); e != nil {
		return nil, e
	}
	return &u, nil
}

// parseStreamConfig parses S2's StreamConfig (every field optional).
func parseStreamConfig(raw json.RawMessage) (optStreamConfig, *apiError) {
	var o optStreamConfig
	m, e := fields(raw, "config")
	if e != nil || m == nil {
		return o, e
	}
	if v := m["storage_class"]; !isNull(v) {
		if o.StorageClass, e = parseStorageClass(v); e != nil {
			return o, e
		}
	}
	if v := m["retention_policy"]; !isNull(v) {
		if o.Retention, e = parseRetention(v); e != nil {
			return o, e
		}
	}
	if v := m["timestamping"]; !isNull(v) {
		ts, e := fields(v, "timestamping")
		if e != nil {
			return o, e
		}
		if x := ts["mode"]; !isNull(x) {
			if o.TSMode, e = parseTSMode(x); e != nil {
				return o, e
			}
		}
		if x := ts["uncapped"]; !isNull(x) {
			if o.TSUncapped, e = parseBool(x, "timestamping.uncapped"); e != nil {
				return o, e
			}
		}
	}
	if v := m["delete_on_empty"]; !isNull(v) {
		d, e := fields(v, "delete_on_empty")
		if e != nil {
			return o, e
		}
		var zero uint64
		o.DOEMinAgeSecs = &zero
		if x := d["min_age_secs"]; !isNull(x) {
			if o.DOEMinAgeSecs, e = parseUint(x, "delete_on_empty.min_age_secs"); e != nil {
				return o, e
			}
		}
	}
	return o, nil
}

// reconfigure applies S2's StreamReconfiguration: an absent field is kept,
// null resets it, nested objects apply recursively.
func (o *optStreamConfig) reconfigure(raw json.RawMessage) *apiError {
	m, e := fields(raw, "reconfiguration")
	if e != nil {
		return e
	}
	if v, ok := m["storage_class"]; ok {
		o.StorageClass = nil
		if !isNull(v) {
			if o.StorageClass, e = parseStorageClass(v); e != nil {
				return e
			}
		}
	}
	if v, ok := m["retention_policy"]; ok {
		o.Retention = nil
		if !isNull(v) {
			if o.Retention, e = parseRetention(v); e != nil {
				return e
			}
		}
	}
	if v, ok := m["timestamping"]; ok {
		if isNull(v) {
			o.TSMode, o.TSUncapped = nil, nil
		} else {
			ts, e := fields(v, "timestamping")
			if e != nil {
				return e
			}
			if x, ok := ts["mode"]; ok {
				o.TSMode = nil
				if !isNull(x) {
					if o.TSMode, e = parseTSMode(x); e != nil {
						return e
					}
				}
			}
			if x, ok := ts["uncapped"]; ok {
				o.TSUncapped = nil
				if !isNull(x) {
					if o.TSUncapped, e = parseBool(x, "timestamping.uncapped"); e != nil {
						return e
					}
				}
			}
		}
	}
	if v, ok := m["delete_on_empty"]; ok {
		if isNull(v) {
			o.DOEMinAgeSecs = nil
		} else {
			d, e := fields(v, "delete_on_empty")
			if e != nil {
				return e
			}
			if x, ok := d["min_age_secs"]; ok {
				o.DOEMinAgeSecs = nil
				if !isNull(x) {
					if o.DOEMinAgeSecs, e = parseUint(x, "delete_on_empty.min_age_secs"); e != nil {
						return e
					}
				}
			}
		}
	}
	return nil
}

func cipherUnsupported(raw json.RawMessage) *apiError {
	if !isNull(raw) {
		return errorf(codeNotImplemented, "s2local does not implement stream encryption (stream_cipher)")
	}
	return nil
}

// parseBasinConfig parses S2's BasinConfig (every field optional).
func parseBasinConfig(raw json.RawMessage) (basinConfig, *apiError) {
	var b basinConfig
	m, e := fields(raw, "config")
	if e != nil || m == nil {
		return b, e
	}
	if e := cipherUnsupported(m["stream_cipher"]); e != nil {
		return b, e
	}
	if b.DefaultStream, e = parseStreamConfig(m["default_stream_config"]); e != nil {
		return b, e
	}
	for key, dst := range map[string]*bool{"create_stream_on_append": &b.CreateOnAppend, "create_stream_on_read": &b.CreateOnRead} {
		if v := m[key]; !isNull(v) {
			if e := decodeField(v, dst, key); e != nil {
				return b, e
			}
		}
	}
	return b, nil
}

// reconfigure applies S2's BasinReconfiguration.
func (b *basinConfig) reconfigure(raw json.RawMessage) *apiError {
	m, e := fields(raw, "reconfiguration")
	if e != nil {
		return e
	}
	if e := cipherUnsupported(m["stream_cipher"]); e != nil {
		return e
	}
	if v, ok := m["default_stream_config"]; ok {
		if isNull(v) {
			b.DefaultStream = optStreamConfig{}
		} else if e := b.DefaultStream.reconfigure(v); e != nil {
			return e
		}
	}
	for key, dst := range map[string]*bool{"create_stream_on_append": &b.CreateOnAppend, "create_stream_on_read": &b.CreateOnRead} {
		if v, ok := m[key]; ok {
			if e := decodeField(v, dst, key); e != nil {
				return e
			}
		}
	}
	return nil
}
