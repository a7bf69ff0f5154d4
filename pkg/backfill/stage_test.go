package backfill

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/natstest"
)

// TestStage: staged chunks (NULLs, empty strings, binary bytes, large
// rows) come back from the object store as they went in; truncated data is
// refused, not misread; a missing chunk is nil (seeded).
func TestStage(t *testing.T) {
	_, js := natstest.New(t).Connect(t)
	ctx := context.Background()
	st, err := EnsureStage(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rnd := rand.New(rand.NewPCG(seed, 2))
	val := func() []byte {
		switch rnd.IntN(5) {
		case 0:
			return nil
		case 1:
			return []byte{}
		case 2:
			b := make([]byte, rnd.IntN(300<<10))
			for i := range b {
				b[i] = byte(rnd.IntN(256))
			}
			return b
		}
		return []byte(fmt.Sprint(rnd.Int64()))
	}
	for i := range 4 {
		s := &Staged{Schema: "Odd", Name: "T.x", Sink: "users", Shape: "\"id\", \"Col Name\"\x0023,25", Cursor: [][]byte{val(), val()}, Last: i%2 == 1, ReadAt: rnd.Int64()}
		for range rnd.IntN(50) {
			s.Rows = append(s.Rows, [][]byte{val(), val()})
		}
		name := StageName("src", ChunkID{Job: "j", Table: `"Odd"."T"`, Chunk: int64(i)})
		if err := st.Put(ctx, name, s); err != nil {
			t.Fatal(err)
		}
		got, err := st.Get(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if s.Rows == nil {
			s.Rows = [][][]byte{}
		}
		if !reflect.DeepEqual(got, s) {
			t.Fatalf("seed %d chunk %d: staged chunk changed on the way", seed, i)
		}
		b, _ := s.MarshalBinary()
		var bad Staged
		if err := bad.UnmarshalBinary(b[:len(b)-1]); !errors.Is(err, ErrBadStaged) && len(b) > 1 {
			t.Fatalf("seed %d: truncated chunk decoded: %v", seed, err)
		}
		if err := st.Delete(ctx, name); err != nil {
			t.Fatal(err)
		}
		if got, err := st.Get(ctx, name); got != nil || err != nil {
			t.Fatalf("deleted chunk read back: %v %v", got, err)
		}
	}
	if err := st.Delete(ctx, "never"); err != nil {
		t.Fatal(err)
	}
}
