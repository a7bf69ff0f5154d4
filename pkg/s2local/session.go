package s2local

import (
	"encoding/binary"
	"io"
	"net/http"
)

// S2S session framing (s2-specs s2/v1/s2s.md), used with
// Content-Type: s2s/proto:
//
//	frame    = length (3 bytes: flag + body) | flag | body
//	flag     = T (bit 7: terminal) | CC (bits 6-5: 0 none, 1 zstd, 2 gzip)
//	regular  = a protobuf message
//	terminal = status (2 bytes) | JSON error body
//
// All integers big-endian. s2local never compresses what it sends; it
// accepts zstd and gzip frames.
const (
	maxS2SFrame      = 2 << 20
	flagTerminal     = 0x80
	flagCompression  = 0x60
	compressionShift = 5
)

type frameReader struct {
	r   io.Reader
	hdr [4]byte
	buf []byte
}

func newFrameReader(r io.Reader) *frameReader { return &frameReader{r: r} }

// next returns the next regular frame's payload, decompressed; the slice
// is valid until the next call. It returns errEndOfFrames at a clean end.
func (f *frameReader) next() ([]byte, *apiError) {
	if _, err := io.ReadFull(f.r, f.hdr[:3]); err != nil {
		if err == io.EOF {
			return nil, errEndOfFrames
		}
		return nil, errorf(codeBadFrame, "read frame: %v", err)
	}
	n := int(f.hdr[0])<<16 | int(f.hdr[1])<<8 | int(f.hdr[2])
	if n < 1 || n > maxS2SFrame {
		return nil, errorf(codeBadFrame, "frame length %d out of range", n)
	}
	if cap(f.buf) < n {
		f.buf = make([]byte, n)
	}
	f.buf = f.buf[:n]
	if _, err := io.ReadFull(f.r, f.buf); err != nil {
		return nil, errorf(codeBadFrame, "read frame: %v", err)
	}
	flag, payload := f.buf[0], f.buf[1:]
	if flag&flagTerminal != 0 {
		return nil, errorf(codeBadFrame, "unexpected terminal frame as input")
	}
	switch (flag & flagCompression) >> compressionShift {
	case 0:
		return payload, nil
	case 1:
		out, err := decompress("zstd", payload)
		if err != nil {
			return nil, errorf(codeBadFrame, "zstd frame: %v", err)
		}
		return out, nil
	case 2:
		out, err := decompress("gzip", payload)
		if err != nil {
			return nil, errorf(codeBadFrame, "gzip frame: %v", err)
		}
		return out, nil
	}
	return nil, errorf(codeBadFrame, "unknown frame compression")
}

// errEndOfFrames marks the clean end of the input (compared by identity).
var errEndOfFrames = &apiError{code: "end", message: "end of frames"}

// sessionWriter writes frames of an s2s response.
type sessionWriter struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	buf []byte
}

func startSession(w http.ResponseWriter, rc *http.ResponseController) *sessionWriter {
	h := w.Header()
	h.Set("Content-Type", "s2s/proto")
	h.Set("Cache-Control", "no-cache, no-transform")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	return &sessionWriter{w: w, rc: rc}
}

func (s *sessionWriter) frame(flag byte, parts ...[]byte) error {
	n := 1
	for _, p := range parts {
		n += len(p)
	}
	s.buf = append(s.buf[:0], byte(n>>16), byte(n>>8), byte(n), flag)
	for _, p := range parts {
		s.buf = append(s.buf, p...)
	}
	if _, err := s.w.Write(s.buf); err != nil {
		return err
	}
	return s.rc.Flush()
}

// message sends a regular frame holding a protobuf message.
func (s *sessionWriter) message(msg []byte) error { return s.frame(0, msg) }

// terminal ends the session with an error.
func (s *sessionWriter) terminal(e *apiError) {
	var st [2]byte
	binary.BigEndian.PutUint16(st[:], uint16(e.status))
	_ = s.frame(flagTerminal, st[:], e.bodyBytes())
}
