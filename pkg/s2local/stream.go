package s2local

import (
	"bufio"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sort"
	"sync"
	"time"
)

// batchEntry indexes one append batch: where its frame is and what it holds.
type batchEntry struct {
	firstSeq uint64
	lastTS   uint64
	off      int64
	size     uint32 // frame size
	count    uint32
	data     []byte // the frame, in memory mode
}

// stream is one stream's records and state. Appends hold mu for the
// sequencing and the write(2) of the batch; readers take a snapshot under mu
// and read outside it.
type stream struct {
	name  string
	basin *basin

	mu          sync.Mutex
	dir         string // "" in memory mode
	createdAt   time.Time
	cfg         streamConfig
	creationKey string
	deleted     bool
	f           *os.File
	size        int64
	index       []batchEntry
	tail        uint64
	lastTS      uint64
	fence       string
	trim        uint64
	notify      chan struct{} // closed on the next append; nil until a reader waits

	syncMu sync.Mutex
	synced int64
}

const logFileName = "records.log"

func nowMillis() uint64 { return uint64(time.Now().UnixMilli()) }

// append sequences a validated batch, writes it and returns its ack.
func (s *stream) append(b *batchBuilder, req appendRequest, fsync bool) (appendAck, *apiError) {
	now := nowMillis()
	s.mu.Lock()
	if s.deleted {
		s.mu.Unlock()
		return appendAck{}, s.notFound()
	}
	if s.dir != "" && s.f == nil {
		s.mu.Unlock()
		return appendAck{}, errorf(codeUnavailable, "s2local is shutting down")
	}
	if req.hasFence && req.fence != s.fence {
		s.mu.Unlock()
		return appendAck{}, fencingTokenMismatch(s.fence)
	}
	if req.hasMatch && req.matchSeq != s.tail {
		s.mu.Unlock()
		return appendAck{}, seqNumMismatch(s.tail)
	}
	mode, uncapped := s.cfg.TSMode, s.cfg.TSUncapped
	ts := s.lastTS
	var firstTS uint64
	for i, r := range b.recs {
		t := now
		switch mode {
		case tsClientRequire:
			if !r.hasTS {
				s.mu.Unlock()
				return appendAck{}, errorf(codeInvalid, "record timestamp was required but was missing")
			}
			t = r.ts
		case tsClientPrefer:
			if r.hasTS {
				t = r.ts
			}
		}
		if !uncapped && t > now {
			t = now
		}
		if t < ts {
			t = ts
		}
		ts = t
		if i == 0 {
			firstTS = t
		}
		b.setTimestamp(i, t)
	}
	first := s.tail
	frame := b.frame(first)
	e := batchEntry{firstSeq: first, lastTS: ts, off: s.size, size: uint32(len(frame)), count: uint32(len(b.recs))}
	if s.f != nil {
		if _, err := s.f.WriteAt(frame, s.size); err != nil {
			_ = s.f.Truncate(s.size)
			s.mu.Unlock()
			return appendAck{}, errorf(codeStorage, "write %s/%s: %v", s.basin.name, s.name, err)
		}
	} else {
		e.data = append([]byte(nil), frame...)
	}
	s.index = append(s.index, e)
	s.size += int64(len(frame))
	s.tail += uint64(len(b.recs))
	s.lastTS = ts
	for _, c := range b.cmds {
		s.apply(first+uint64(c.index), c)
	}
	if s.notify != nil {
		close(s.notify)
		s.notify = nil
	}
	written, f := s.size, s.f
	tail := position{s.tail, ts}
	s.mu.Unlock()
	if fsync && f != nil {
		if err := s.syncTo(f, written); err != nil {
			return appendAck{}, errorf(codeStorage, "fsync %s/%s: %v", s.basin.name, s.name, err)
		}
	}
	return appendAck{start: position{first, firstTS}, end: tail, tail: tail}, nil
}

// apply applies a command record at seq (S2's streamer.apply_command).
func (s *stream) apply(seq uint64, c command) {
	switch c.op {
	case cmdFence:
		s.fence = c.token
	case cmdTrim:
		tp := min(c.trim, seq+1)
		if tp > s.trim {
			s.trim = tp
		}
	}
}

// syncTo makes the log durable up to at least off; concurrent callers share
// one fdatasync (group commit).
func (s *stream) syncTo(f *os.File, off int64) error {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	if s.synced >= off {
		return nil
	}
	s.mu.Lock()
	target := s.size
	s.mu.Unlock()
	if err := fdatasync(f); err != nil {
		return err
	}
	s.synced = target
	return nil
}

func (s *stream) notFound() *apiError {
	return errorf(codeStreamNotFound, "stream `%s` in basin `%s` not found", s.name, s.basin.name)
}

func (s *stream) tailPos() (position, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deleted {
		return position{}, s.notFound()
	}
	return position{s.tail, s.lastTS}, nil
}

// streamView is a consistent snapshot for reading.
type streamView struct {
	s      *stream
	tail   position
	trim   uint64
	index  []batchEntry
	f      *os.File
	notify chan struct{} // closed when the stream changes
}

func (s *stream) view(wantNotify bool) (streamView, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deleted {
		return streamView{}, s.notFound()
	}
	v := streamView{s: s, tail: position{s.tail, s.lastTS}, trim: s.trim, index: s.index[:len(s.index):len(s.index)], f: s.f}
	if wantNotify {
		if s.notify == nil {
			s.notify = make(chan struct{})
		}
		v.notify = s.notify
	}
	return v, nil
}

// recordRef is a record found by a read.
type recordRef struct {
	seq uint64
	rec storedRecord
}

// readBufs holds the buffers a read's records point into.
type readBufs struct{ bufs [][]byte }

var readBufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1<<20); return &b }}

func (rb *readBufs) get(n int) []byte {
	p := readBufPool.Get().(*[]byte)
	b := *p
	if cap(b) < n {
		b = make([]byte, n)
	}
	b = b[:n]
	rb.bufs = append(rb.bufs, b)
	return b
}

func (rb *readBufs) release() {
	for _, b := range rb.bufs {
		if cap(b) <= 8<<20 {
			b := b[:0]
			readBufPool.Put(&b)
		}
	}
	rb.bufs = rb.bufs[:0]
}

// Per-response caps of a read (S2's RECORD_BATCH_MAX).
const (
	maxReadRecords = 1000
	maxReadBytes   = 1 << 20
	readSpanBytes  = 2 << 20 // how much log one pread covers at most
)

// readLimit is what a read may still return: count and metered bytes
// (negative = unbounded) and an exclusive timestamp bound.
type readLimit struct {
	count, bytes int64
	until        uint64
	hasUntil     bool
}

// collect reads records from seq from on, up to the view's tail, at most one
// response's worth and within lim. done reports that lim (or until) stops
// the read; next is the seq after the last record returned.
func (v *streamView) collect(from uint64, lim readLimit, rb *readBufs, out []recordRef) (recs []recordRef, next uint64, done bool, err error) {
	from = max(from, v.trim)
	next = from
	if from >= v.tail.seq {
		return out, next, false, nil
	}
	i := sort.Search(len(v.index), func(i int) bool {
		e := &v.index[i]
		return e.firstSeq+uint64(e.count) > from
	})
	var count, bytes int64
	for i < len(v.index) {
		// Read a span of consecutive frames.
		j, span := i, int64(0)
		for j < len(v.index) && (j == i || span+int64(v.index[j].size) <= readSpanBytes) {
			span += int64(v.index[j].size)
			j++
		}
		var data []byte // the span, read from disk (memory mode: frames in the index)
		if v.f != nil {
			data = rb.get(int(span))
			if _, err := v.f.ReadAt(data, v.index[i].off); err != nil {
				if errors.Is(err, os.ErrClosed) {
					return out, next, true, errStreamGone
				}
				return out, next, true, err
			}
		}
		var off int64
		for ; i < j; i++ {
			e := &v.index[i]
			frame := e.data
			if frame == nil {
				frame = data[off : off+int64(e.size)]
			}
			off += int64(e.size)
			p := frame[frameHeaderLen:]
			seq := e.firstSeq
			for k := 0; k < int(e.count); k, seq = k+1, seq+1 {
				r, n, ok := nextRecord(p)
				if !ok {
					return out, next, true, fmt.Errorf("corrupt frame at offset %d", e.off)
				}
				p = p[n:]
				if seq < from {
					continue
				}
				if lim.hasUntil && r.ts >= lim.until {
					return out, next, true, nil
				}
				if (lim.count >= 0 && count+1 > lim.count) || (lim.bytes >= 0 && bytes+int64(r.metered) > lim.bytes) {
					return out, next, true, nil
				}
				if count+1 > maxReadRecords || bytes+int64(r.metered) > maxReadBytes {
					return out, next, false, nil
				}
				out = append(out, recordRef{seq, r})
				count++
				bytes += int64(r.metered)
				next = seq + 1
			}
		}
	}
	return out, next, false, nil
}

var errStreamGone = errors.New("stream deleted")

// seqForTimestamp returns the first seq whose timestamp is >= ts, or the tail.
func (v *streamView) seqForTimestamp(ts uint64, rb *readBufs) (uint64, error) {
	i := sort.Search(len(v.index), func(i int) bool { return v.index[i].lastTS >= ts })
	if i == len(v.index) {
		return v.tail.seq, nil
	}
	e := &v.index[i]
	frame := e.data
	if frame == nil {
		frame = rb.get(int(e.size))
		if _, err := v.f.ReadAt(frame, e.off); err != nil {
			return 0, err
		}
	}
	p := frame[frameHeaderLen:]
	for k := 0; k < int(e.count); k++ {
		r, n, ok := nextRecord(p)
		if !ok {
			break
		}
		if r.ts >= ts {
			return e.firstSeq + uint64(k), nil
		}
		p = p[n:]
	}
	return e.firstSeq + uint64(e.count), nil
}

// --- disk ------------------------------------------------------------------

// openLog opens a stream's log and rebuilds its state, verifying every
// frame; a torn or corrupt tail is truncated.
func (s *stream) openLog(log func(msg string, args ...any)) error {
	path := s.dir + "/" + logFileName
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	r := bufio.NewReaderSize(f, 1<<20)
	var off int64
	hdr := make([]byte, frameHeaderLen)
	var payload []byte
	bad := ""
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			if err != io.EOF {
				bad = "torn frame header"
			}
			break
		}
		fh, ok := parseFrameHeader(hdr)
		if !ok {
			bad = "bad frame header"
			break
		}
		if cap(payload) < fh.payloadLen {
			payload = make([]byte, fh.payloadLen)
		}
		payload = payload[:fh.payloadLen]
		if _, err := io.ReadFull(r, payload); err != nil {
			bad = "torn frame"
			break
		}
		crc := crc32.Update(crc32.Checksum(hdr[12:], castagnoli), castagnoli, payload)
		if crc != fh.crc {
			bad = "checksum mismatch"
			break
		}
		if fh.firstSeq != s.tail {
			bad = fmt.Sprintf("frame starts at seq %d, expected %d", fh.firstSeq, s.tail)
			break
		}
		p := payload
		var cmds []command
		var lastTS uint64
		valid := true
		for k := 0; k < fh.count; k++ {
			rec, n, ok := nextRecord(p)
			if !ok {
				valid = false
				break
			}
			p = p[n:]
			lastTS = rec.ts
			if c, ok := storedCommand(rec.rest); ok {
				c.index = k
				cmds = append(cmds, c)
			}
		}
		if !valid || len(p) != 0 {
			bad = "malformed records"
			break
		}
		size := int64(frameHeaderLen + fh.payloadLen)
		s.index = append(s.index, batchEntry{firstSeq: fh.firstSeq, lastTS: lastTS, off: off, size: uint32(size), count: uint32(fh.count)})
		for _, c := range cmds {
			s.apply(fh.firstSeq+uint64(c.index), c)
		}
		s.tail += uint64(fh.count)
		s.lastTS = lastTS
		off += size
	}
	if bad != "" {
		st, _ := f.Stat()
		log("truncating torn or corrupt log tail", "basin", s.basin.name, "stream", s.name,
			"reason", bad, "offset", off, "dropped_bytes", st.Size()-off)
		if err := f.Truncate(off); err != nil {
			f.Close()
			return err
		}
	}
	s.f, s.size, s.synced = f, off, off
	return nil
}

// close closes the log, syncing it first.
func (s *stream) close(sync bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	var err error
	if sync {
		err = fdatasync(s.f)
	}
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	s.f = nil
	return err
}

// markDeleted makes the stream unusable and wakes its readers.
func (s *stream) markDeleted() {
	s.mu.Lock()
	s.deleted = true
	if s.notify != nil {
		close(s.notify)
		s.notify = nil
	}
	if s.f != nil {
		_ = s.f.Close()
		s.f = nil
	}
	s.mu.Unlock()
}
