package s2local_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/s2local"
)

// Tests that drive s2local with the official Go SDK.

func wantS2Error(t *testing.T, err error, status int, code string) {
	t.Helper()
	var se *s2.S2Error
	if !errors.As(err, &se) {
		t.Fatalf("error %v (%T), want an S2Error %d %s", err, err, status, code)
	}
	if se.Status != status || (code != "" && se.Code != code) {
		t.Fatalf("error %d %q (%s), want %d %q", se.Status, se.Code, se.Message, status, code)
	}
}

func TestSDKBasins(t *testing.T) {
	ctx := context.Background()
	_, base := startServer(t, s2local.Options{})
	c := newSDK(base, "")

	info, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: "alpha-basin", Config: &s2.BasinConfig{CreateStreamOnAppend: s2.Bool(true)}})
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "alpha-basin" || info.CreatedAt.IsZero() || time.Since(info.CreatedAt) > time.Minute {
		t.Fatalf("created %+v", info)
	}
	_, err = c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: "alpha-basin"})
	wantS2Error(t, err, http.StatusConflict, "resource_already_exists")
	for _, n := range []s2.BasinName{"alpha-basin-2", "beta-basin", "gamma-basin"} {
		if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: n}); err != nil {
			t.Fatal(err)
		}
	}

	list, err := c.Basins.List(ctx, &s2.ListBasinsArgs{Prefix: "alpha"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Basins) != 2 || list.Basins[0].Name != "alpha-basin" || list.Basins[1].Name != "alpha-basin-2" || list.HasMore {
		t.Fatalf("list prefix alpha: %+v", list)
	}
	list, err = c.Basins.List(ctx, &s2.ListBasinsArgs{StartAfter: "alpha-basin", Limit: s2.Ptr(2)})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Basins) != 2 || list.Basins[0].Name != "alpha-basin-2" || list.Basins[1].Name != "beta-basin" || !list.HasMore {
		t.Fatalf("list start_after alpha-basin limit 2: %+v", list)
	}
	var all []s2.BasinName
	it := c.Basins.Iter(ctx, &s2.ListBasinsArgs{Limit: s2.Ptr(1)})
	for it.Next() {
		all = append(all, it.Value().Name)
	}
	if it.Err() != nil || fmt.Sprint(all) != "[alpha-basin alpha-basin-2 beta-basin gamma-basin]" {
		t.Fatalf("iter: %v %v", all, it.Err())
	}

	cfg, err := c.Basins.GetConfig(ctx, "alpha-basin")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.CreateStreamOnAppend == nil || !*cfg.CreateStreamOnAppend {
		t.Fatalf("config %+v", cfg)
	}
	mode := s2.TimestampingModeArrival
	cfg, err = c.Basins.Reconfigure(ctx, s2.ReconfigureBasinArgs{Basin: "alpha-basin", Config: s2.BasinReconfiguration{
		CreateStreamOnAppend: s2.Bool(false), CreateStreamOnRead: s2.Bool(true),
		DefaultStreamConfig: &s2.StreamReconfiguration{Timestamping: &s2.TimestampingReconfiguration{Mode: &mode}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if *cfg.CreateStreamOnAppend || !*cfg.CreateStreamOnRead || cfg.DefaultStreamConfig == nil ||
		cfg.DefaultStreamConfig.Timestamping == nil || *cfg.DefaultStreamConfig.Timestamping.Mode != mode {
		t.Fatalf("reconfigured %+v", cfg)
	}
	// A stream created now gets the basin's default config.
	b := c.Basin("alpha-basin")
	mustCreateStream(t, b, "s")
	scfg, err := b.Streams.GetConfig(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	if *scfg.Timestamping.Mode != mode {
		t.Fatalf("stream config %+v", scfg.Timestamping)
	}

	ens, err := c.Basins.Ensure(ctx, s2.EnsureBasinArgs{Basin: "delta-basin"})
	if err != nil || ens.Result != s2.ProvisionResultCreated || ens.Basin.Name != "delta-basin" {
		t.Fatalf("ensure new: %+v %v", ens, err)
	}
	ens, err = c.Basins.Ensure(ctx, s2.EnsureBasinArgs{Basin: "delta-basin"})
	if err != nil || ens.Result != s2.ProvisionResultNoop {
		t.Fatalf("ensure same: %+v %v", ens, err)
	}
	ens, err = c.Basins.Ensure(ctx, s2.EnsureBasinArgs{Basin: "delta-basin", Config: &s2.BasinConfig{CreateStreamOnRead: s2.Bool(true)}})
	if err != nil || ens.Result != s2.ProvisionResultUpdated {
		t.Fatalf("ensure changed: %+v %v", ens, err)
	}

	if err := c.Basins.Delete(ctx, "alpha-basin"); err != nil {
		t.Fatal(err)
	}
	_, err = c.Basins.GetConfig(ctx, "alpha-basin")
	wantS2Error(t, err, http.StatusNotFound, "basin_not_found")
	err = c.Basins.Delete(ctx, "alpha-basin")
	wantS2Error(t, err, http.StatusNotFound, "basin_not_found")
	_, err = b.Stream("s").CheckTail(ctx)
	wantS2Error(t, err, http.StatusNotFound, "basin_not_found")
}

func TestSDKStreams(t *testing.T) {
	ctx := context.Background()
	b, _ := setup(t, s2local.Options{})

	info, err := b.Streams.Create(ctx, s2.CreateStreamArgs{Stream: "orders", Config: &s2.StreamConfig{
		RetentionPolicy: &s2.RetentionPolicy{Infinite: &s2.InfiniteRetention{}},
	}})
	if err != nil || info.Name != "orders" {
		t.Fatalf("create: %+v %v", info, err)
	}
	_, err = b.Streams.Create(ctx, s2.CreateStreamArgs{Stream: "orders"})
	wantS2Error(t, err, http.StatusConflict, "resource_already_exists")
	for _, n := range []string{"orders.eu", "orders.us", "users", "a/b c.*>"} {
		mustCreateStream(t, b, n)
	}

	list, err := b.Streams.List(ctx, &s2.ListStreamsArgs{Prefix: "orders"})
	if err != nil || len(list.Streams) != 3 || list.HasMore {
		t.Fatalf("list prefix: %+v %v", list, err)
	}
	list, err = b.Streams.List(ctx, &s2.ListStreamsArgs{Prefix: "orders", StartAfter: "orders", Limit: s2.Ptr(1)})
	if err != nil || len(list.Streams) != 1 || list.Streams[0].Name != "orders.eu" || !list.HasMore {
		t.Fatalf("list start_after limit: %+v %v", list, err)
	}

	cfg, err := b.Streams.GetConfig(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RetentionPolicy == nil || cfg.RetentionPolicy.Infinite == nil || *cfg.StorageClass != s2.StorageClassExpress ||
		*cfg.Timestamping.Mode != s2.TimestampingModeClientPrefer || *cfg.DeleteOnEmpty.MinAgeSecs != 0 {
		t.Fatalf("config: %+v", cfg)
	}
	cfg, err = b.Streams.GetConfig(ctx, "users")
	if err != nil || cfg.RetentionPolicy.Age == nil || *cfg.RetentionPolicy.Age != 7*24*3600 {
		t.Fatalf("default retention: %+v %v", cfg, err)
	}
	std := s2.StorageClassStandard
	cfg, err = b.Streams.Reconfigure(ctx, s2.ReconfigureStreamArgs{Stream: "orders", Config: s2.StreamReconfiguration{
		StorageClass: &std, ClearRetentionPolicy: true, Timestamping: &s2.TimestampingReconfiguration{Uncapped: s2.Bool(true)},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if *cfg.StorageClass != std || cfg.RetentionPolicy.Age == nil || *cfg.RetentionPolicy.Age != 7*24*3600 ||
		!*cfg.Timestamping.Uncapped || *cfg.Timestamping.Mode != s2.TimestampingModeClientPrefer {
		t.Fatalf("reconfigured: %+v %+v", cfg, cfg.Timestamping)
	}
	_, err = b.Streams.Reconfigure(ctx, s2.ReconfigureStreamArgs{Stream: "orders", Config: s2.StreamReconfiguration{
		RetentionPolicy: &s2.RetentionPolicy{Age: s2.Int64(0)},
	}})
	wantS2Error(t, err, http.StatusUnprocessableEntity, "invalid")

	ens, err := b.Streams.Ensure(ctx, s2.EnsureStreamArgs{Stream: "new"})
	if err != nil || ens.Result != s2.ProvisionResultCreated {
		t.Fatalf("ensure new: %+v %v", ens, err)
	}
	ens, err = b.Streams.Ensure(ctx, s2.EnsureStreamArgs{Stream: "new"})
	if err != nil || ens.Result != s2.ProvisionResultNoop {
		t.Fatalf("ensure same: %+v %v", ens, err)
	}
	ens, err = b.Streams.Ensure(ctx, s2.EnsureStreamArgs{Stream: "new", Config: &s2.StreamConfig{StorageClass: &std}})
	if err != nil || ens.Result != s2.ProvisionResultUpdated {
		t.Fatalf("ensure changed: %+v %v", ens, err)
	}

	if err := b.Streams.Delete(ctx, "a/b c.*>"); err != nil {
		t.Fatal(err)
	}
	_, err = b.Streams.GetConfig(ctx, "a/b c.*>")
	wantS2Error(t, err, http.StatusNotFound, "stream_not_found")
	_, err = b.Stream("nope").CheckTail(ctx)
	wantS2Error(t, err, http.StatusNotFound, "stream_not_found")
	_, err = b.Stream("nope").Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}})
	wantS2Error(t, err, http.StatusNotFound, "stream_not_found")
}

func TestSDKAppendReadTail(t *testing.T) {
	ctx := context.Background()
	b, _ := setup(t, s2local.Options{})
	s := mustCreateStream(t, b, "events")

	tail, err := s.CheckTail(ctx)
	if err != nil || tail.Tail.SeqNum != 0 || tail.Tail.Timestamp != 0 {
		t.Fatalf("empty tail: %+v %v", tail, err)
	}
	before := uint64(time.Now().UnixMilli())
	ack, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{
		{Body: []byte("one"), Headers: []s2.Header{s2.NewHeader("k", "v"), {Name: []byte("bin"), Value: []byte{0, 255}}}},
		{Body: []byte("two")},
		{},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if ack.Start.SeqNum != 0 || ack.End.SeqNum != 3 || ack.Tail.SeqNum != 3 || ack.Start.Timestamp < before {
		t.Fatalf("ack %+v", ack)
	}
	// Client timestamps: kept when not lower than the last, else raised to
	// it; capped at arrival time (uncapped is off).
	last := ack.End.Timestamp
	future := uint64(time.Now().Add(time.Hour).UnixMilli())
	ack, err = s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{
		{Body: []byte("old"), Timestamp: s2.Uint64(last - 1000)},
		{Body: []byte("future"), Timestamp: s2.Uint64(future)},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if ack.Start.SeqNum != 3 || ack.Start.Timestamp != last || ack.End.Timestamp >= future || ack.End.Timestamp < last {
		t.Fatalf("ack %+v (last %d)", ack, last)
	}

	batch, err := s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0)})
	if err != nil {
		t.Fatal(err)
	}
	if len(batch.Records) != 5 || batch.Tail == nil || batch.Tail.SeqNum != 5 {
		t.Fatalf("read: %d records, tail %+v", len(batch.Records), batch.Tail)
	}
	r0 := batch.Records[0]
	if string(r0.Body) != "one" || len(r0.Headers) != 2 || string(r0.Headers[0].Name) != "k" || string(r0.Headers[0].Value) != "v" ||
		string(r0.Headers[1].Value) != "\x00\xff" || r0.SeqNum != 0 {
		t.Fatalf("record 0: %+v", r0)
	}
	if len(batch.Records[2].Body) != 0 || len(batch.Records[2].Headers) != 0 {
		t.Fatalf("record 2: %+v", batch.Records[2])
	}
	for i := 1; i < len(batch.Records); i++ {
		if batch.Records[i].SeqNum != uint64(i) || batch.Records[i].Timestamp < batch.Records[i-1].Timestamp {
			t.Fatalf("records %d: %+v after %+v", i, batch.Records[i], batch.Records[i-1])
		}
	}
	batch, err = s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(1), Count: s2.Uint64(2)})
	if err != nil || len(batch.Records) != 2 || string(batch.Records[0].Body) != "two" || batch.Records[1].SeqNum != 2 {
		t.Fatalf("read count 2: %+v %v", batch, err)
	}
	batch, err = s.Read(ctx, &s2.ReadOptions{TailOffset: s2.Int64(1)})
	if err != nil || len(batch.Records) != 1 || string(batch.Records[0].Body) != "future" {
		t.Fatalf("read tail_offset 1: %+v %v", batch, err)
	}
	batch, err = s.Read(ctx, &s2.ReadOptions{Timestamp: s2.Uint64(last)})
	if err != nil || len(batch.Records) == 0 || batch.Records[0].Timestamp < last {
		t.Fatalf("read timestamp: %+v %v", batch, err)
	}
	// bytes: the first record's metered size is 8 + 2*2 + 1+1+3+2 + 3 = 22.
	batch, err = s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0), Bytes: s2.Uint64(22 + 10)})
	if err != nil || len(batch.Records) != 1 {
		t.Fatalf("read bytes: %+v %v", batch, err)
	}

	_, err = s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(6)})
	var rns *s2.RangeNotSatisfiableError
	if !errors.As(err, &rns) || rns.Tail == nil || rns.Tail.SeqNum != 5 {
		t.Fatalf("read beyond tail: %v", err)
	}
	// At the tail without waiting is also 416; with clamp beyond the tail
	// too (nothing to return without wait).
	_, err = s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(5)})
	if !errors.As(err, &rns) {
		t.Fatalf("read at tail: %v", err)
	}
	// Long poll: wait for the next append.
	go func() {
		time.Sleep(200 * time.Millisecond)
		_, _ = s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("late")}}})
	}()
	start := time.Now()
	batch, err = s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(100), Clamp: s2.Bool(true), Wait: s2.Int32(5)})
	if err != nil || len(batch.Records) != 1 || string(batch.Records[0].Body) != "late" || batch.Records[0].SeqNum != 5 {
		t.Fatalf("long poll: %+v %v", batch, err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("long poll took %v", d)
	}
	tail, err = s.CheckTail(ctx)
	if err != nil || tail.Tail.SeqNum != 6 {
		t.Fatalf("tail: %+v %v", tail, err)
	}
}

func TestSDKMatchSeqNum(t *testing.T) {
	ctx := context.Background()
	b, _ := setup(t, s2local.Options{})
	s := mustCreateStream(t, b, "s")
	rec := []s2.AppendRecord{{Body: []byte("a")}, {Body: []byte("b")}}
	if _, err := s.Append(ctx, &s2.AppendInput{Records: rec, MatchSeqNum: s2.Uint64(0)}); err != nil {
		t.Fatal(err)
	}
	_, err := s.Append(ctx, &s2.AppendInput{Records: rec, MatchSeqNum: s2.Uint64(0)})
	var mm *s2.SeqNumMismatchError
	if !errors.As(err, &mm) || mm.ExpectedSeqNum != 2 || mm.Status != http.StatusPreconditionFailed {
		t.Fatalf("want SeqNumMismatchError with 2, got %v", err)
	}
	if ack, err := s.Append(ctx, &s2.AppendInput{Records: rec, MatchSeqNum: s2.Uint64(2)}); err != nil || ack.End.SeqNum != 4 {
		t.Fatalf("append at 2: %+v %v", ack, err)
	}
}

func TestSDKFencing(t *testing.T) {
	ctx := context.Background()
	b, _ := setup(t, s2local.Options{})
	s := mustCreateStream(t, b, "s")
	// The token starts empty: "" matches, anything else does not.
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}, FencingToken: s2.String("")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{s2.NewFenceCommandRecord("writer-1", nil)}}); err != nil {
		t.Fatal(err)
	}
	_, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("y")}}, FencingToken: s2.String("writer-2")})
	var fm *s2.FencingTokenMismatchError
	if !errors.As(err, &fm) || fm.ExpectedFencingToken != "writer-1" {
		t.Fatalf("want FencingTokenMismatchError with writer-1, got %v", err)
	}
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("y")}}, FencingToken: s2.String("writer-1")}); err != nil {
		t.Fatal(err)
	}
	// Without a token the append is not fenced.
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("z")}}}); err != nil {
		t.Fatal(err)
	}
	// Fencing is checked before match_seq_num.
	_, err = s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("w")}}, FencingToken: s2.String("x"), MatchSeqNum: s2.Uint64(99)})
	if !errors.As(err, &fm) {
		t.Fatalf("want fencing mismatch first, got %v", err)
	}
	// A token longer than 36 bytes in a fence command is invalid (the SDK
	// checks fencing_token itself, not the command body).
	_, err = s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{s2.NewFenceCommandRecord(string(make([]byte, 37)), nil)}})
	wantS2Error(t, err, http.StatusUnprocessableEntity, "invalid")
	// The command record is a record: it is read back.
	batch, err := s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(1), Count: s2.Uint64(1)})
	if err != nil || len(batch.Records) != 1 || !batch.Records[0].IsCommandRecord() || string(batch.Records[0].Body) != "writer-1" {
		t.Fatalf("fence record: %+v %v", batch, err)
	}
}

func TestSDKTrim(t *testing.T) {
	ctx := context.Background()
	b, _ := setup(t, s2local.Options{})
	s := mustCreateStream(t, b, "s")
	var recs []s2.AppendRecord
	for i := range 10 {
		recs = append(recs, s2.AppendRecord{Body: fmt.Appendf(nil, "%d", i)})
	}
	if _, err := s.Append(ctx, &s2.AppendInput{Records: recs}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{s2.NewTrimCommandRecord(4, nil)}}); err != nil {
		t.Fatal(err)
	}
	batch, err := s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0)})
	if err != nil || len(batch.Records) != 7 || batch.Records[0].SeqNum != 4 || string(batch.Records[0].Body) != "4" {
		t.Fatalf("read after trim: %+v %v", batch, err)
	}
	// A trim point beyond the record is capped at it: everything is gone.
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{s2.NewTrimCommandRecord(1000, nil)}}); err != nil {
		t.Fatal(err)
	}
	batch, err = s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0)})
	if err != nil || len(batch.Records) != 0 || batch.Tail == nil || batch.Tail.SeqNum != 12 {
		t.Fatalf("read after trimming all: %+v %v", batch, err)
	}
	rs, err := s.ReadSession(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0), Wait: s2.Int32(1)})
	if err != nil {
		t.Fatal(err)
	}
	if rs.Next() || rs.Err() != nil {
		t.Fatalf("session over a trimmed stream: %+v %v", rs.Record(), rs.Err())
	}
}

func TestSDKCreateStreamOnAppend(t *testing.T) {
	ctx := context.Background()
	_, base := startServer(t, s2local.Options{})
	c := newSDK(base, "")
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: testBasin, Config: &s2.BasinConfig{CreateStreamOnAppend: s2.Bool(true)}}); err != nil {
		t.Fatal(err)
	}
	s := c.Basin(testBasin).Stream("auto")
	if _, err := s.CheckTail(ctx); err == nil {
		t.Fatal("check tail of a missing stream succeeded")
	}
	ack, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}})
	if err != nil || ack.End.SeqNum != 1 {
		t.Fatalf("append: %+v %v", ack, err)
	}
	list, err := c.Basin(testBasin).Streams.List(ctx, nil)
	if err != nil || len(list.Streams) != 1 || list.Streams[0].Name != "auto" {
		t.Fatalf("list: %+v %v", list, err)
	}
}

func TestSDKAuth(t *testing.T) {
	ctx := context.Background()
	_, base := startServer(t, s2local.Options{Token: "sekret"})
	_, err := newSDK(base, "wrong").Basins.List(ctx, nil)
	wantS2Error(t, err, http.StatusUnauthorized, "authn")
	r := do(t, "GET", base+"/v1/basins", nil)
	wantError(t, r, http.StatusUnauthorized, "authn")
	if _, err := newSDK(base, "sekret").Basins.List(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if r := do(t, "GET", base+"/health", nil); r.status != http.StatusOK {
		t.Fatalf("health: %d", r.status)
	}
	// Without --token any token is accepted.
	_, base = startServer(t, s2local.Options{})
	if _, err := newSDK(base, "whatever").Basins.List(ctx, nil); err != nil {
		t.Fatal(err)
	}
}

// TestSDKFromEnvironment: S2_ACCOUNT_ENDPOINT and S2_BASIN_ENDPOINT both set
// to s2local's address is all the SDK needs.
func TestSDKFromEnvironment(t *testing.T) {
	ctx := context.Background()
	_, base := startServer(t, s2local.Options{})
	t.Setenv("S2_ACCESS_TOKEN", "local")
	t.Setenv("S2_ACCOUNT_ENDPOINT", base)
	t.Setenv("S2_BASIN_ENDPOINT", base)
	c := s2.NewFromEnvironment(&s2.ClientOptions{RetryConfig: &s2.RetryConfig{MaxAttempts: 1}})
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: testBasin}); err != nil {
		t.Fatal(err)
	}
	s := mustCreateStream(t, c.Basin(testBasin), "s")
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}}); err != nil {
		t.Fatal(err)
	}
	if tail, err := s.CheckTail(ctx); err != nil || tail.Tail.SeqNum != 1 {
		t.Fatalf("tail %+v %v", tail, err)
	}
}

// TestSDKSessions: the SDK's append session (pipelined appends over one
// s2s/proto request) and read session (follows the tail).
func TestSDKSessions(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, _ := setup(t, s2local.Options{})
	s := mustCreateStream(t, b, "s")

	rs, err := s.ReadSession(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0)})
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	as, err := s.AppendSession(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	const batches, per = 50, 20
	// Waiting for each submission's ticket fixes the order; the acks are
	// pipelined.
	var tickets []*s2.BatchSubmitTicket
	for i := range batches {
		var recs []s2.AppendRecord
		for j := range per {
			recs = append(recs, s2.AppendRecord{Body: fmt.Appendf(nil, "%d-%d", i, j)})
		}
		f, err := as.Submit(&s2.AppendInput{Records: recs})
		if err != nil {
			t.Fatal(err)
		}
		ticket, err := f.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		tickets = append(tickets, ticket)
	}
	for i, ticket := range tickets {
		ack, err := ticket.Ack(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ack.Start.SeqNum != uint64(i*per) || ack.End.SeqNum != uint64((i+1)*per) {
			t.Fatalf("ack %d: %+v", i, ack)
		}
	}
	if err := as.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range batches * per {
		if !rs.Next() {
			t.Fatalf("read session ended at %d: %v", i, rs.Err())
		}
		r := rs.Record()
		if r.SeqNum != uint64(i) || string(r.Body) != fmt.Sprintf("%d-%d", i/per, i%per) {
			t.Fatalf("record %d: %d %q", i, r.SeqNum, r.Body)
		}
	}
	// The read session follows: a later append arrives.
	if _, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("live")}}}); err != nil {
		t.Fatal(err)
	}
	if !rs.Next() || string(rs.Record().Body) != "live" {
		t.Fatalf("live record: %v", rs.Err())
	}

	// A read session with a count ends by itself.
	rs2, err := s.ReadSession(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(10), Count: s2.Uint64(5)})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for rs2.Next() {
		n++
	}
	if rs2.Err() != nil || n != 5 {
		t.Fatalf("bounded session: %d records, %v", n, rs2.Err())
	}

	// The SDK's Producer (per-record submits, batched into a session).
	ps, err := s.AppendSession(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	prod := s2.NewProducer(ctx, s2.NewBatcher(ctx, &s2.BatchingOptions{MaxRecords: 7}), ps)
	var ptickets []*s2.RecordSubmitTicket
	for i := range 30 {
		f, err := prod.Submit(s2.AppendRecord{Body: fmt.Appendf(nil, "p%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		tk, err := f.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ptickets = append(ptickets, tk)
	}
	for i, tk := range ptickets {
		ack, err := tk.Ack(ctx)
		if err != nil || ack.SeqNum() != uint64(batches*per+1+i) {
			t.Fatalf("producer record %d: %v %v", i, ack, err)
		}
	}
	prod.Close()
	ps.Close()

	// An append session's failure reaches the SDK: match_seq_num mismatch.
	as2, err := s.AppendSession(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer as2.Close()
	f, err := as2.Submit(&s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}, MatchSeqNum: s2.Uint64(0)})
	if err != nil {
		t.Fatal(err)
	}
	ticket, err := f.Wait(ctx)
	if err == nil {
		_, err = ticket.Ack(ctx)
	}
	var mm *s2.SeqNumMismatchError
	if !errors.As(err, &mm) || mm.ExpectedSeqNum != batches*per+1+30 {
		t.Fatalf("want a seq_num mismatch, got %v", err)
	}
}

// TestSDKConcurrentWriters: several writers on one stream get contiguous,
// disjoint ranges and every record is stored once.
func TestSDKConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	b, _ := setup(t, s2local.Options{DataDir: dir})
	s := mustCreateStream(t, b, "s")
	const writers, batches, per = 4, 25, 40
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range batches {
				recs := make([]s2.AppendRecord, per)
				for j := range recs {
					recs[j].Body = fmt.Appendf(nil, "w%d-%d-%d", w, i, j)
				}
				ack, err := s.Append(ctx, &s2.AppendInput{Records: recs})
				if err == nil && ack.End.SeqNum-ack.Start.SeqNum != per {
					err = fmt.Errorf("ack %+v", ack)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for seq := uint64(0); seq < writers*batches*per; {
		batch, err := s.Read(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(seq)})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range batch.Records {
			if r.SeqNum != seq || seen[string(r.Body)] {
				t.Fatalf("record %d: seq %d body %q (seen %v)", seq, r.SeqNum, r.Body, seen[string(r.Body)])
			}
			seen[string(r.Body)] = true
			seq++
		}
	}
	if tail, err := s.CheckTail(ctx); err != nil || tail.Tail.SeqNum != writers*batches*per {
		t.Fatalf("tail %+v %v", tail, err)
	}
}
