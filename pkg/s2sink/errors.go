package s2sink

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"
)

// Class says how delivery should treat a failure.
type Class int

const (
	// RetrySoon: transient (throttling, unavailability, timeouts, network);
	// retry with a short back-off.
	RetrySoon Class = iota + 1
	// RetryUntilFixed: retrying the same request fails until an operator
	// fixes the token, the stream or the payload (401, 403, 404, 400,
	// 413/422); retry with back-off up to the maximum, keep it visible.
	RetryUntilFixed
	// SeqNumMismatch: a match_seq_num append found another tail (412); the
	// caller decides whether its earlier attempt landed.
	SeqNumMismatch
	// FencingMismatch: the stream is fenced by another writer's token (412).
	FencingMismatch
)

func (c Class) String() string {
	switch c {
	case RetrySoon:
		return "retry-soon"
	case RetryUntilFixed:
		return "retry-until-fixed"
	case SeqNumMismatch:
		return "seq-num-mismatch"
	case FencingMismatch:
		return "fencing-mismatch"
	}
	return "unknown"
}

// Error is a classified S2 failure with what an operator needs to see: the
// HTTP status, S2's error code and message. It never holds the token.
type Error struct {
	Op      string
	Class   Class
	Status  int    // HTTP status; 0 for network errors and timeouts
	Code    string // S2's error code, e.g. "stream_not_found"
	Message string
	// RetryAfter is S2's retry-after-ms hint (429), or 0.
	RetryAfter time.Duration
	// MayHaveTakenEffect is true when the request may have been applied
	// although it failed (timeouts, 5xx, network errors after sending).
	MayHaveTakenEffect bool
	// Tail is the stream's tail reported by a seq_num mismatch.
	Tail uint64
	Err  error
}

func (e *Error) Error() string {
	switch {
	case e.Status != 0 && e.Code != "":
		return fmt.Sprintf("%s: S2 %d %s: %s", e.Op, e.Status, e.Code, e.Message)
	case e.Status != 0:
		return fmt.Sprintf("%s: S2 %d: %s", e.Op, e.Status, e.Message)
	}
	return fmt.Sprintf("%s: %s", e.Op, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// Classify returns err as *Error when it is one (nil otherwise).
func Classify(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return nil
}

func classify(op string, err error, retryAfter time.Duration) *Error {
	e := &Error{Op: op, Err: err, RetryAfter: retryAfter, Message: err.Error()}
	var seq *s2.SeqNumMismatchError
	var fence *s2.FencingTokenMismatchError
	var se *s2.S2Error
	switch {
	case errors.As(err, &seq):
		e.Class, e.Status, e.Code, e.Tail = SeqNumMismatch, seq.Status, "seq_num_mismatch", seq.ExpectedSeqNum
		e.Message = fmt.Sprintf("stream tail is %d", seq.ExpectedSeqNum)
		return e
	case errors.As(err, &fence):
		e.Class, e.Status, e.Code = FencingMismatch, fence.Status, "fencing_token_mismatch"
		e.Message = "stream is fenced by another writer"
		return e
	case errors.As(err, &se) && se.Origin == "sdk":
		// The SDK refused the request before sending it (e.g. over S2's
		// limits): the same request never succeeds.
		e.Class, e.Code, e.Message = RetryUntilFixed, strings.ToLower(se.Code), se.Message
		return e
	case errors.As(err, &se) && se.Status != 0:
		e.Status, e.Code, e.Message = se.Status, se.Code, se.Message
		switch se.Status {
		case 408, 500, 502, 503, 504:
			e.Class = RetrySoon
			e.MayHaveTakenEffect = !se.HasNoSideEffects()
		case 409, 429:
			e.Class = RetrySoon
		default: // 400, 401, 403, 404, 413, 416, 422, ...
			e.Class = RetryUntilFixed
		}
		return e
	}
	// No HTTP answer: a timeout, a cancelled request, or the network. The
	// request may have reached S2.
	e.Class, e.MayHaveTakenEffect = RetrySoon, true
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, s2.ErrTimeout) || (errors.As(err, &ne) && ne.Timeout()):
		e.Message = "timed out: " + err.Error()
	case errors.Is(err, context.Canceled):
		e.Message = "cancelled"
	}
	return e
}
