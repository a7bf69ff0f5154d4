package pgrepl

import (
	"context"
	"encoding/binary"
	"testing"
)

// A logical decoding message (pgoutput's 'M', sent with messages 'true')
// decodes into an EventMessage at its own LSN.
func TestDecodeLogicalMessage(t *testing.T) {
	for _, tc := range []struct {
		flags byte
		tx    bool
	}{{0, false}, {1, true}} {
		b := []byte{'M', tc.flags}
		b = binary.BigEndian.AppendUint64(b, 0x16B3748)
		b = append(b, "pgs2\x00"...)
		b = binary.BigEndian.AppendUint32(b, 5)
		b = append(b, `{"a"}`...)
		d := &Decoder{rels: map[uint32]*relation{}}
		ev, err := d.Decode(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Kind != EventMessage || ev.LSN != 0x16B3748 || ev.Message.Prefix != "pgs2" ||
			string(ev.Message.Content) != `{"a"}` || ev.Message.Transactional != tc.tx {
			t.Fatalf("flags %d: got %+v", tc.flags, ev)
		}
		if d.InTx() {
			t.Fatal("a message outside a transaction must not open one")
		}
	}
}
