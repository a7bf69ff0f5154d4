package bus

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// StreamKey names one delivery stream in delivery's positions: its name
// and its creation time, so that positions of a stream deleted and created
// again under the same name (its sequences start over) are not taken for
// the new one's. It is one subject-safe token ([A-Za-z0-9_%@-]).
func StreamKey(name string, created time.Time) string {
	return EscapeToken(name) + "@" + strconv.FormatInt(created.UnixMilli(), 36)
}

// KeyName is the stream name of a StreamKey.
func KeyName(key string) string {
	if i := strings.LastIndexByte(key, '@'); i >= 0 {
		key = key[:i]
	}
	return UnescapeToken(key)
}

// DeliveryPos is the position of one change in a delivery stream: the
// stream, its message's sequence and its index in the message's batch.
type DeliveryPos struct {
	Stream string // a StreamKey
	Seq    uint64
	Idx    int
}

// WholeMessage is the Idx of a position that stands for a whole message.
const WholeMessage = 1 << 30

// Less orders positions of one stream.
func (p DeliveryPos) Less(q DeliveryPos) bool {
	return p.Seq < q.Seq || (p.Seq == q.Seq && p.Idx < q.Idx)
}

// String is "<stream key>:<seq>.<idx>".
func (p DeliveryPos) String() string {
	return p.Stream + ":" + strconv.FormatUint(p.Seq, 10) + "." + strconv.Itoa(p.Idx)
}

// ParseDeliveryPos reads "<stream key>:<seq>.<idx>" (or
// "<stream key>:<seq>": the whole message).
func ParseDeliveryPos(s string) (DeliveryPos, error) {
	key, rest, ok := strings.Cut(s, ":")
	if !ok || key == "" {
		return DeliveryPos{}, fmt.Errorf("delivery position %q: want <stream>:<seq>.<index>", s)
	}
	seqS, idxS, hasIdx := strings.Cut(rest, ".")
	seq, err := strconv.ParseUint(seqS, 10, 64)
	if err != nil {
		return DeliveryPos{}, fmt.Errorf("delivery position %q: want <stream>:<seq>.<index>", s)
	}
	if !hasIdx {
		return DeliveryPos{Stream: key, Seq: seq, Idx: WholeMessage}, nil
	}
	idx, err := strconv.Atoi(idxS)
	if err != nil || idx < 0 {
		return DeliveryPos{}, fmt.Errorf("delivery position %q: want <stream>:<seq>.<index>", s)
	}
	return DeliveryPos{Stream: key, Seq: seq, Idx: idx}, nil
}

// Progress is a position per delivery stream: delivery reads one stream
// per source, in its own order, into the same S2 stream.
type Progress map[string]DeliveryPos

// Covers reports whether pos is at or before the progress of its stream.
func (p Progress) Covers(pos DeliveryPos) bool {
	cur, ok := p[pos.Stream]
	return ok && !cur.Less(pos)
}

// Advance moves the progress of pos's stream to pos, if later.
func (p Progress) Advance(pos DeliveryPos) {
	if !p.Covers(pos) {
		p[pos.Stream] = pos
	}
}

// Merge advances p to every position of q.
func (p Progress) Merge(q Progress) {
	for _, pos := range q {
		p.Advance(pos)
	}
}

// Clone copies p.
func (p Progress) Clone() Progress {
	q := make(Progress, len(p))
	for k, v := range p {
		q[k] = v
	}
	return q
}

// Equal reports whether p and q hold the same positions.
func (p Progress) Equal(q Progress) bool {
	if len(p) != len(q) {
		return false
	}
	for k, v := range p {
		if w, ok := q[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// String is the positions, sorted by stream, separated by commas.
func (p Progress) String() string {
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p[k].String())
	}
	return b.String()
}

// ParseProgress reads Progress.String ("": no position).
func ParseProgress(s string) (Progress, error) {
	p := Progress{}
	if s == "" {
		return p, nil
	}
	for part := range strings.SplitSeq(s, ",") {
		pos, err := ParseDeliveryPos(part)
		if err != nil {
			return nil, err
		}
		p.Advance(pos)
	}
	return p, nil
}
