package s2local

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// store holds every basin and stream, in memory or under a data directory:
//
//	DIR/basins/<basin>/basin.json                      basin metadata
//	DIR/basins/<basin>/streams/<id>/stream.json        stream metadata
//	DIR/basins/<basin>/streams/<id>/records.log        the stream's records
//	DIR/tmp/, DIR/trash/                               staging, deletions
//
// <id> is a hash of the stream name (names may hold any bytes). Metadata
// files are replaced atomically (temp file + rename); a basin or stream is
// created by renaming a complete staged directory into place and deleted by
// renaming it into trash.
type store struct {
	dir   string
	fsync bool
	log   func(msg string, args ...any)

	mu     sync.RWMutex
	basins map[string]*basin
}

type basin struct {
	name string
	dir  string

	mu          sync.RWMutex
	createdAt   time.Time
	location    *string
	cfg         basinConfig
	creationKey string
	deleted     bool
	streams     map[string]*stream
}

func newStore(dir string, fsync bool, log func(string, ...any)) (*store, error) {
	st := &store{dir: dir, fsync: fsync, log: log, basins: map[string]*basin{}}
	if dir == "" {
		return st, nil
	}
	for _, d := range []string{"basins", "tmp", "trash"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{"tmp", "trash"} {
		ents, _ := os.ReadDir(filepath.Join(dir, d))
		for _, e := range ents {
			if err := os.RemoveAll(filepath.Join(dir, d, e.Name())); err != nil {
				return nil, err
			}
		}
	}
	if err := st.recover(); err != nil {
		return nil, err
	}
	return st, nil
}

// --- persisted metadata -------------------------------------------------

type basinFile struct {
	Name        string          `json:"name"`
	CreatedAt   time.Time       `json:"created_at"`
	Location    *string         `json:"location"`
	Config      json.RawMessage `json:"config"`
	CreationKey string          `json:"creation_key,omitempty"`
}

type streamFile struct {
	Name        string          `json:"name"`
	CreatedAt   time.Time       `json:"created_at"`
	Config      json.RawMessage `json:"config"`
	CreationKey string          `json:"creation_key,omitempty"`
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func (b *basin) file() basinFile {
	return basinFile{Name: b.name, CreatedAt: b.createdAt, Location: b.location, Config: mustJSON(b.cfg.apiJSON()), CreationKey: b.creationKey}
}

func (s *stream) file() streamFile {
	return streamFile{Name: s.name, CreatedAt: s.createdAt, Config: mustJSON(s.cfg.apiJSON()), CreationKey: s.creationKey}
}

// writeFileAtomic replaces path with data: temp file, (fsync), rename,
// (fsync of the directory).
func (st *store) writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil && st.fsync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = st.rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

// rename moves from to to and (with fsync) makes the move durable by
// syncing to's directory.
func (st *store) rename(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return st.syncDir(filepath.Dir(to))
}

func (st *store) syncDir(dir string) error {
	if !st.fsync {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func randomName() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func streamDirName(name string) string {
	h := sha256.Sum256([]byte(name))
	return hex.EncodeToString(h[:16])
}

// stage creates a fresh directory under tmp/.
func (st *store) stage() (string, error) {
	d := filepath.Join(st.dir, "tmp", randomName())
	return d, os.Mkdir(d, 0o755)
}

// remove moves dir into trash and deletes it.
func (st *store) remove(dir string) error {
	t := filepath.Join(st.dir, "trash", randomName())
	if err := os.Rename(dir, t); err != nil {
		return err
	}
	if err := st.syncDir(filepath.Dir(dir)); err != nil {
		return err
	}
	return os.RemoveAll(t)
}

func storageErr(what string, err error) *apiError {
	return errorf(codeStorage, "%s: %v", what, err)
}

// --- recovery -------------------------------------------------------------

func (st *store) recover() error {
	ents, err := os.ReadDir(filepath.Join(st.dir, "basins"))
	if err != nil {
		return err
	}
	nStreams := 0
	for _, e := range ents {
		dir := filepath.Join(st.dir, "basins", e.Name())
		var bf basinFile
		if err := readJSONFile(filepath.Join(dir, "basin.json"), &bf); err != nil {
			return err
		}
		cfg, aerr := parseBasinConfig(bf.Config)
		if aerr != nil {
			return fmt.Errorf("%s: %v", dir, aerr)
		}
		b := &basin{name: bf.Name, dir: dir, createdAt: bf.CreatedAt, location: bf.Location, cfg: cfg, creationKey: bf.CreationKey, streams: map[string]*stream{}}
		sents, err := os.ReadDir(filepath.Join(dir, "streams"))
		if err != nil {
			return err
		}
		for _, se := range sents {
			sdir := filepath.Join(dir, "streams", se.Name())
			var sf streamFile
			if err := readJSONFile(filepath.Join(sdir, "stream.json"), &sf); err != nil {
				return err
			}
			o, aerr := parseStreamConfig(sf.Config)
			if aerr != nil {
				return fmt.Errorf("%s: %v", sdir, aerr)
			}
			s := &stream{name: sf.Name, basin: b, dir: sdir, createdAt: sf.CreatedAt, cfg: o.resolve(optStreamConfig{}), creationKey: sf.CreationKey}
			if err := s.openLog(st.log); err != nil {
				return fmt.Errorf("open log of %s/%s: %w", b.name, s.name, err)
			}
			b.streams[s.name] = s
			nStreams++
		}
		st.basins[b.name] = b
	}
	st.log("recovered data directory", "dir", st.dir, "basins", len(st.basins), "streams", nStreams)
	return nil
}

func readJSONFile(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// close syncs and closes every log.
func (st *store) close() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	var errs []error
	for _, b := range st.basins {
		b.mu.Lock()
		for _, s := range b.streams {
			errs = append(errs, s.close(true))
		}
		b.mu.Unlock()
	}
	return errors.Join(errs...)
}

// --- basins ------------------------------------------------------------------

func basinNotFound(name string) *apiError {
	return errorf(codeBasinNotFound, "basin `%s` not found", name)
}

func (st *store) getBasin(name string) (*basin, *apiError) {
	st.mu.RLock()
	b := st.basins[name]
	st.mu.RUnlock()
	if b == nil {
		return nil, basinNotFound(name)
	}
	return b, nil
}

type basinInfo struct {
	Name      string  `json:"name"`
	Location  *string `json:"location"`
	CreatedAt string  `json:"created_at"`
	DeletedAt *string `json:"deleted_at"`
	State     string  `json:"state"`
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func (b *basin) info() basinInfo {
	return basinInfo{Name: b.name, Location: b.location, CreatedAt: rfc3339(b.createdAt), State: "active"}
}

func (st *store) listBasins(prefix, startAfter string, limit int) ([]basinInfo, bool) {
	st.mu.RLock()
	names, more := page(st.basins, prefix, startAfter, limit)
	out := make([]basinInfo, 0, len(names))
	for _, n := range names {
		b := st.basins[n]
		b.mu.RLock()
		out = append(out, b.info())
		b.mu.RUnlock()
	}
	st.mu.RUnlock()
	return out, more
}

// provision outcomes, as in S2's s2-provision-result header.
const (
	provCreated = "created"
	provUpdated = "updated"
	provNoop    = "noop"
)

// createBasin creates a basin. With ensure it is idempotent and updates the
// config of an existing basin; else an existing basin is a conflict unless
// the same request token created it with the same config.
func (st *store) createBasin(name string, cfg basinConfig, location *string, requestToken string, ensure bool) (basinInfo, string, *apiError) {
	st.mu.Lock()
	defer st.mu.Unlock()
	key := ""
	if requestToken != "" {
		key = requestToken + "\x00" + string(mustJSON(cfg.apiJSON()))
	}
	if b := st.basins[name]; b != nil {
		b.mu.Lock()
		defer b.mu.Unlock()
		switch {
		case ensure && mustEqualJSON(b.cfg.apiJSON(), cfg.apiJSON()):
			return b.info(), provNoop, nil
		case ensure:
			old := b.cfg
			b.cfg = cfg
			if e := st.saveBasin(b); e != nil {
				b.cfg = old
				return basinInfo{}, "", e
			}
			return b.info(), provUpdated, nil
		case key != "" && key == b.creationKey:
			return b.info(), provNoop, nil
		}
		return basinInfo{}, "", errorf(codeResourceExists, "basin `%s` already exists", name)
	}
	b := &basin{name: name, createdAt: time.Now().UTC(), location: location, cfg: cfg, creationKey: key, streams: map[string]*stream{}}
	if st.dir != "" {
		tmp, err := st.stage()
		if err != nil {
			return basinInfo{}, "", storageErr("create basin", err)
		}
		final := filepath.Join(st.dir, "basins", name)
		err = os.Mkdir(filepath.Join(tmp, "streams"), 0o755)
		if err == nil {
			err = st.writeFileAtomic(filepath.Join(tmp, "basin.json"), mustJSON(b.file()))
		}
		if err == nil {
			err = st.syncDir(tmp)
		}
		if err == nil {
			err = st.rename(tmp, final)
		}
		if err != nil {
			_ = os.RemoveAll(tmp)
			return basinInfo{}, "", storageErr("create basin", err)
		}
		b.dir = final
	}
	st.basins[name] = b
	return b.info(), provCreated, nil
}

func mustEqualJSON(a, b any) bool { return string(mustJSON(a)) == string(mustJSON(b)) }

// saveBasin persists b's metadata; b.mu is held.
func (st *store) saveBasin(b *basin) *apiError {
	if st.dir == "" {
		return nil
	}
	if err := st.writeFileAtomic(filepath.Join(b.dir, "basin.json"), mustJSON(b.file())); err != nil {
		return storageErr("save basin", err)
	}
	return nil
}

func (st *store) basinConfig(name string) (basinConfig, *apiError) {
	b, e := st.getBasin(name)
	if e != nil {
		return basinConfig{}, e
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.cfg, nil
}

func (st *store) reconfigureBasin(name string, raw json.RawMessage) (basinConfig, *apiError) {
	b, e := st.getBasin(name)
	if e != nil {
		return basinConfig{}, e
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	cfg := b.cfg
	if e := cfg.reconfigure(raw); e != nil {
		return basinConfig{}, e
	}
	old := b.cfg
	b.cfg = cfg
	if e := st.saveBasin(b); e != nil {
		b.cfg = old
		return basinConfig{}, e
	}
	return cfg, nil
}

func (st *store) deleteBasin(name string) *apiError {
	st.mu.Lock()
	defer st.mu.Unlock()
	b := st.basins[name]
	if b == nil {
		return basinNotFound(name)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, s := range b.streams {
		s.markDeleted()
	}
	if st.dir != "" {
		if err := st.remove(b.dir); err != nil {
			return storageErr("delete basin", err)
		}
	}
	b.deleted = true
	delete(st.basins, name)
	return nil
}

// --- streams -------------------------------------------------------------------

type streamInfo struct {
	Name      string  `json:"name"`
	CreatedAt string  `json:"created_at"`
	DeletedAt *string `json:"deleted_at"`
	Cipher    *string `json:"cipher"`
}

func (s *stream) info() streamInfo { return streamInfo{Name: s.name, CreatedAt: rfc3339(s.createdAt)} }

func (b *basin) listStreams(prefix, startAfter string, limit int) ([]streamInfo, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	names, more := page(b.streams, prefix, startAfter, limit)
	out := make([]streamInfo, 0, len(names))
	for _, n := range names {
		out = append(out, b.streams[n].info())
	}
	return out, more
}

func (b *basin) getStream(name string) (*stream, *apiError) {
	b.mu.RLock()
	s := b.streams[name]
	b.mu.RUnlock()
	if s == nil {
		return nil, errorf(codeStreamNotFound, "stream `%s` in basin `%s` not found", name, b.name)
	}
	return s, nil
}

// provisionMode says how createStream treats an existing stream.
type provisionMode int

const (
	modeCreate provisionMode = iota // conflict, unless the same request token created it
	modeEnsure                      // make its config match
	modeAuto                        // use it as it is (create_stream_on_append/read)
)

// createStream creates a stream in basin b.
func (st *store) createStream(b *basin, name string, o optStreamConfig, requestToken string, mode provisionMode) (*stream, string, *apiError) {
	ensure := mode == modeEnsure
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.deleted {
		return nil, "", basinNotFound(b.name)
	}
	cfg := o.resolve(b.cfg.DefaultStream)
	key := ""
	if requestToken != "" {
		key = requestToken + "\x00" + string(mustJSON(o.apiJSON()))
	}
	if s := b.streams[name]; s != nil {
		if mode == modeAuto {
			return s, provNoop, nil
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		switch {
		case ensure && s.cfg == cfg:
			return s, provNoop, nil
		case ensure:
			old := s.cfg
			s.cfg = cfg
			if e := st.saveStream(s); e != nil {
				s.cfg = old
				return nil, "", e
			}
			return s, provUpdated, nil
		case key != "" && key == s.creationKey:
			return s, provNoop, nil
		}
		return nil, "", errorf(codeResourceExists, "stream `%s` in basin `%s` already exists", name, b.name)
	}
	s := &stream{name: name, basin: b, createdAt: time.Now().UTC(), cfg: cfg, creationKey: key}
	if st.dir != "" {
		tmp, err := st.stage()
		if err != nil {
			return nil, "", storageErr("create stream", err)
		}
		final := filepath.Join(b.dir, "streams", streamDirName(name))
		err = st.writeFileAtomic(filepath.Join(tmp, "stream.json"), mustJSON(s.file()))
		if err == nil {
			var f *os.File
			if f, err = os.Create(filepath.Join(tmp, logFileName)); err == nil {
				err = f.Close()
			}
		}
		if err == nil {
			err = st.syncDir(tmp)
		}
		if err == nil {
			err = st.rename(tmp, final)
		}
		if err == nil {
			s.dir = final
			s.f, err = os.OpenFile(filepath.Join(final, logFileName), os.O_RDWR, 0o644)
		}
		if err != nil {
			_ = os.RemoveAll(tmp)
			return nil, "", storageErr("create stream", err)
		}
	}
	b.streams[name] = s
	return s, provCreated, nil
}

// saveStream persists s's metadata; s.mu is held.
func (st *store) saveStream(s *stream) *apiError {
	if st.dir == "" {
		return nil
	}
	if err := st.writeFileAtomic(filepath.Join(s.dir, "stream.json"), mustJSON(s.file())); err != nil {
		return storageErr("save stream", err)
	}
	return nil
}

func (st *store) streamConfig(s *stream) (streamConfig, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deleted {
		return streamConfig{}, s.notFound()
	}
	return s.cfg, nil
}

func (st *store) reconfigureStream(b *basin, s *stream, raw json.RawMessage) (streamConfig, *apiError) {
	b.mu.RLock()
	defaults := b.cfg.DefaultStream
	b.mu.RUnlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deleted {
		return streamConfig{}, s.notFound()
	}
	o := s.cfg.opt()
	if e := o.reconfigure(raw); e != nil {
		return streamConfig{}, e
	}
	old := s.cfg
	s.cfg = o.resolve(defaults)
	if e := st.saveStream(s); e != nil {
		s.cfg = old
		return streamConfig{}, e
	}
	return s.cfg, nil
}

func (st *store) deleteStream(b *basin, name string) *apiError {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.streams[name]
	if s == nil {
		return errorf(codeStreamNotFound, "stream `%s` in basin `%s` not found", name, b.name)
	}
	s.markDeleted()
	if st.dir != "" {
		if err := st.remove(s.dir); err != nil {
			return storageErr("delete stream", err)
		}
	}
	delete(b.streams, name)
	return nil
}

// page returns, in order, up to limit names of m that start with prefix and
// sort after startAfter, and whether more follow.
func page[V any](m map[string]V, prefix, startAfter string, limit int) ([]string, bool) {
	var names []string
	for n := range m {
		if strings.HasPrefix(n, prefix) && n > startAfter {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if len(names) > limit {
		return names[:limit], true
	}
	return names, false
}
