// Package s2sink is delivery's S2 client layer over the official Go SDK:
// connecting to S2 (cloud or a local S2-compatible server), building append
// batches within S2's limits, and classifying failures for retrying.
package s2sink

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/config"
)

// Config says how to reach S2 for one sink.
type Config struct {
	// Endpoint of a local S2-compatible server (e.g. http://127.0.0.1:8089);
	// empty means S2's cloud.
	Endpoint string
	// Token is the access token (read by the caller from the sink's
	// access_token_env). Required for the cloud.
	Token string
	// RequestTimeout bounds one request (default 10s).
	RequestTimeout time.Duration
}

// ErrNoToken means a sink for S2's cloud has no access token.
var ErrNoToken = errors.New("no S2 access token")

// Client appends to S2 streams. Safe for concurrent use.
type Client struct {
	sdk *s2.Client
}

// localToken stands in for a missing token on a local server that does
// not check tokens (the SDK refuses an empty one).
const localToken = "local"

// New returns a client. The SDK's own retries are off: delivery owns
// retrying, with back-off and ordering the SDK cannot know about.
func New(c Config) (*Client, error) {
	token := c.Token
	if token == "" {
		if c.Endpoint == "" {
			return nil, fmt.Errorf("%w: set the environment variable named by the sink's access_token_env (default S2_ACCESS_TOKEN)", ErrNoToken)
		}
		token = localToken
	}
	timeout := c.RequestTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	opts := &s2.ClientOptions{
		RetryConfig: &s2.RetryConfig{MaxAttempts: 1, AppendRetryPolicy: s2.AppendRetryPolicyNoSideEffects},
		HTTPClient: &http.Client{
			Timeout:   timeout,
			Transport: &retryAfterTransport{base: &http.Transport{MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second}},
		},
		RequestTimeout: timeout,
	}
	if c.Endpoint != "" {
		base := strings.TrimRight(c.Endpoint, "/")
		if !strings.HasSuffix(base, "/v1") {
			base += "/v1"
		}
		opts.BaseURL = base
		// A direct basin endpoint: every stream request names its basin in
		// the s2-basin header.
		opts.MakeBasinBaseURL = func(string) string { return base }
	}
	return &Client{sdk: s2.New(token, opts)}, nil
}

// SDK returns the underlying SDK client (for tools and tests).
func (c *Client) SDK() *s2.Client { return c.sdk }

// Ack is where an append landed.
type Ack struct {
	// Start is the first appended record's seq_num; End is the last one's + 1.
	Start, End uint64
}

// Append appends a batch atomically. matchSeqNum, when not nil, makes S2
// refuse the append unless the stream's tail is exactly that (see
// Error.SeqNumMismatch). Errors are *Error.
func (c *Client) Append(ctx context.Context, basin, stream string, b *Batch, matchSeqNum *uint64) (Ack, error) {
	return c.AppendFenced(ctx, basin, stream, b, matchSeqNum, nil)
}

// AppendFenced is Append for a fenced writer: S2 refuses the append
// (FencingMismatch) unless the stream's fencing token is *token.
func (c *Client) AppendFenced(ctx context.Context, basin, stream string, b *Batch, matchSeqNum *uint64, token *string) (Ack, error) {
	if b.Len() == 0 {
		return Ack{}, fmt.Errorf("append to %s/%s: empty batch", basin, stream)
	}
	var ra atomic.Int64
	ctx = context.WithValue(ctx, retryAfterKey{}, &ra)
	in := &s2.AppendInput{Records: b.records, MatchSeqNum: matchSeqNum, FencingToken: token}
	ack, err := c.sdk.Basin(basin).Stream(s2.StreamName(stream)).Append(ctx, in)
	if err != nil {
		return Ack{}, classify(fmt.Sprintf("append %d records to %s/%s", b.Len(), basin, stream), err, time.Duration(ra.Load())*time.Millisecond)
	}
	return Ack{Start: ack.Start.SeqNum, End: ack.End.SeqNum}, nil
}

// Tail returns the seq_num the next record appended to the stream gets.
func (c *Client) Tail(ctx context.Context, basin, stream string) (uint64, error) {
	var ra atomic.Int64
	ctx = context.WithValue(ctx, retryAfterKey{}, &ra)
	t, err := c.sdk.Basin(basin).Stream(s2.StreamName(stream)).CheckTail(ctx)
	if err != nil {
		return 0, classify(fmt.Sprintf("check tail of %s/%s", basin, stream), err, time.Duration(ra.Load())*time.Millisecond)
	}
	return t.Tail.SeqNum, nil
}

// CreateStream creates a stream if it does not exist.
func (c *Client) CreateStream(ctx context.Context, basin, stream string) error {
	_, err := c.sdk.Basin(basin).Streams.Create(ctx, s2.CreateStreamArgs{Stream: s2.StreamName(stream)})
	var se *s2.S2Error
	if errors.As(err, &se) && se.Status == http.StatusConflict {
		return nil
	}
	if err != nil {
		return classify(fmt.Sprintf("create stream %s/%s", basin, stream), err, 0)
	}
	return nil
}

// retryAfterTransport records S2's retry-after-ms response header (sent
// with 429s) into the request's context, since the SDK's errors do not
// carry response headers.
type retryAfterTransport struct{ base http.RoundTripper }

type retryAfterKey struct{}

func (t *retryAfterTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if err == nil {
		if v := resp.Header.Get("retry-after-ms"); v != "" {
			if ms, perr := strconv.ParseInt(v, 10, 64); perr == nil {
				if holder, ok := r.Context().Value(retryAfterKey{}).(*atomic.Int64); ok {
					holder.Store(ms)
				}
			}
		}
	}
	return resp, err
}

// FromSink reads a sink's S2 settings: its endpoint and the access token
// from the environment variable it names.
func FromSink(s config.Sink) Config {
	return Config{Endpoint: s.Endpoint, Token: os.Getenv(s.AccessTokenEnv)}
}

// Fence makes token the stream's fencing token (an S2 fence command
// record): from then on only appends carrying it succeed, so a writer that
// lost its ownership cannot append. It returns the stream's new tail.
func (c *Client) Fence(ctx context.Context, basin, stream, token string) (uint64, error) {
	b := NewBatch(1, 0)
	_ = b.Add(s2.AppendRecord{Headers: []s2.Header{{Name: []byte{}, Value: []byte("fence")}}, Body: []byte(token)})
	ack, err := c.Append(ctx, basin, stream, b, nil)
	if err != nil {
		return 0, err
	}
	return ack.End, nil
}
