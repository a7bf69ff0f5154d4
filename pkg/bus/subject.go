// Package bus holds pgs2's use of NATS JetStream: stream definitions,
// subjects, idempotent ordered publishing and an embedded server.
package bus

import (
	"strconv"
	"strings"

	"github.com/cespare/xxhash/v2"
)

// Subject roots.
const (
	ChangesRoot  = "pgs2.changes"
	DeliveryRoot = "pgs2.deliver"
)

// Headers on PGS2_CHANGES messages.
const (
	// HeaderMsgID is JetStream's idempotency key (deduplicated within the
	// stream's duplicate window): park, dead-letter and ack messages.
	HeaderMsgID = "Nats-Msg-Id"
	// HeaderID names a chained message (capture's and router's), read back
	// on resume; not a deduplication key (see Publisher).
	HeaderID              = "Pgs2-Msg-Id"
	HeaderExpectedLastSeq = "Nats-Expected-Last-Sequence"
	HeaderGroup           = "Pgs2-Group"
	HeaderTraceParent     = "traceparent"
)

// EscapeToken makes s one subject token: bytes other than [A-Za-z0-9_-]
// become %XX, so names with '.', '*', '>', spaces or '%' stay one token and
// the mapping is reversible.
func EscapeToken(s string) string {
	clean := true
	for i := 0; i < len(s); i++ {
		if !plain(s[i]) {
			clean = false
			break
		}
	}
	if clean && s != "" {
		return s
	}
	if s == "" {
		return "%"
	}
	var b strings.Builder
	b.Grow(len(s) + 8)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if plain(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexUpper[c>>4])
		b.WriteByte(hexUpper[c&0xF])
	}
	return b.String()
}

// UnescapeToken reverses EscapeToken.
func UnescapeToken(t string) string {
	if t == "%" {
		return ""
	}
	if !strings.Contains(t, "%") {
		return t
	}
	var b strings.Builder
	for i := 0; i < len(t); i++ {
		if t[i] == '%' && i+2 < len(t) {
			if v, err := strconv.ParseUint(t[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(t[i])
	}
	return b.String()
}

const hexUpper = "0123456789ABCDEF"

func plain(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// Partition maps a group key to one of n partitions.
func Partition(group []byte, n int) int {
	return int(xxhash.Sum64(group) % uint64(n))
}

// ChangesFilter is the subject filter of one source's changes.
func ChangesFilter(source string) string {
	return ChangesRoot + "." + EscapeToken(source) + ".>"
}

// ChangeSubjects builds a source's change subjects,
// `pgs2.changes.<source>.<partition>`: a partition holds the changes of
// every table whose groups hash to it, so a transaction over many tables
// travels in as few messages as over one (each entry names its table).
type ChangeSubjects struct {
	subjects []string
}

// NewChangeSubjects returns a subject builder for a source.
func NewChangeSubjects(source string, partitions int) *ChangeSubjects {
	s := &ChangeSubjects{subjects: make([]string, partitions)}
	for i := range s.subjects {
		s.subjects[i] = ChangesRoot + "." + EscapeToken(source) + "." + strconv.Itoa(i)
	}
	return s
}

// Subject returns the subject of a change in group.
func (s *ChangeSubjects) Subject(group []byte) string {
	return s.subjects[Partition(group, len(s.subjects))]
}
