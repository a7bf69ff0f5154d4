package s2local

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
)

// S2's error codes (api/src/v1/error.rs) and their HTTP statuses.
const (
	codeAuthn               = "authn"
	codeBadFrame            = "bad_frame"
	codeBadHeader           = "bad_header"
	codeBadJSON             = "bad_json"
	codeBadPath             = "bad_path"
	codeBadProto            = "bad_proto"
	codeBadQuery            = "bad_query"
	codeBasinNotFound       = "basin_not_found"
	codeHotServer           = "hot_server"
	codeInvalid             = "invalid"
	codeNotImplemented      = "not_implemented"
	codeOther               = "other"
	codeRateLimited         = "rate_limited"
	codeRequestTimeout      = "request_timeout"
	codeResourceExists      = "resource_already_exists"
	codeStorage             = "storage"
	codeStreamNotFound      = "stream_not_found"
	codeUnavailable         = "unavailable"
	codeUpstreamTimeout     = "upstream_timeout"
	codeTransactionConflict = "transaction_conflict"
)

var codeStatus = map[string]int{
	codeAuthn:               http.StatusUnauthorized,
	codeBadFrame:            http.StatusBadRequest,
	codeBadHeader:           http.StatusBadRequest,
	codeBadJSON:             http.StatusBadRequest,
	codeBadPath:             http.StatusBadRequest,
	codeBadProto:            http.StatusBadRequest,
	codeBadQuery:            http.StatusBadRequest,
	codeBasinNotFound:       http.StatusNotFound,
	codeHotServer:           http.StatusBadGateway,
	codeInvalid:             http.StatusUnprocessableEntity,
	codeNotImplemented:      http.StatusNotImplemented,
	codeOther:               http.StatusInternalServerError,
	codeRateLimited:         http.StatusTooManyRequests,
	codeRequestTimeout:      http.StatusRequestTimeout,
	codeResourceExists:      http.StatusConflict,
	codeStorage:             http.StatusInternalServerError,
	codeStreamNotFound:      http.StatusNotFound,
	codeUnavailable:         http.StatusServiceUnavailable,
	codeUpstreamTimeout:     http.StatusGatewayTimeout,
	codeTransactionConflict: http.StatusConflict,
}

// apiError is an error response. Most have S2's standard body
// {"code","message"}; append conditions (412) and reads beyond the tail
// (416) have their own bodies.
type apiError struct {
	status  int
	code    string
	message string
	// body, when set, replaces the standard body.
	body []byte
	// retryAfterMS, when > 0, is sent as the retry-after-ms header.
	retryAfterMS int64
}

func (e *apiError) Error() string {
	if e.body != nil {
		return fmt.Sprintf("HTTP %d: %s", e.status, e.body)
	}
	return fmt.Sprintf("HTTP %d %s: %s", e.status, e.code, e.message)
}

func errorf(code, format string, args ...any) *apiError {
	st, ok := codeStatus[code]
	if !ok {
		st = http.StatusInternalServerError
	}
	return &apiError{status: st, code: code, message: fmt.Sprintf(format, args...)}
}

// seqNumMismatch is S2's 412 for a failed match_seq_num: the body carries
// the stream's current tail.
func seqNumMismatch(tail uint64) *apiError {
	return &apiError{status: http.StatusPreconditionFailed, code: "seq_num_mismatch",
		body: []byte(`{"seq_num_mismatch":` + strconv.FormatUint(tail, 10) + `}`)}
}

// fencingTokenMismatch is S2's 412 for a failed fencing_token: the body
// carries the stream's current token.
func fencingTokenMismatch(current string) *apiError {
	b, _ := json.Marshal(map[string]string{"fencing_token_mismatch": current})
	return &apiError{status: http.StatusPreconditionFailed, code: "fencing_token_mismatch", body: b}
}

// unwritten is S2's 416 for a read that starts beyond the tail.
func unwritten(tail position) *apiError {
	return &apiError{status: http.StatusRequestedRangeNotSatisfiable, code: "unwritten",
		body: []byte(`{"tail":` + tail.json() + `}`)}
}

// bodyBytes is the JSON body of the error response.
func (e *apiError) bodyBytes() []byte {
	if e.body != nil {
		return e.body
	}
	b, _ := json.Marshal(struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{e.code, e.message})
	return b
}

func writeError(w http.ResponseWriter, e *apiError) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if e.retryAfterMS > 0 {
		h.Set("retry-after-ms", strconv.FormatInt(e.retryAfterMS, 10))
	}
	b := e.bodyBytes()
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(e.status)
	_, _ = w.Write(b)
}

// position is a stream position: a sequence number and a timestamp (ms).
type position struct {
	seq uint64
	ts  uint64
}

func (p position) json() string {
	return `{"seq_num":` + strconv.FormatUint(p.seq, 10) + `,"timestamp":` + strconv.FormatUint(p.ts, 10) + `}`
}
