package console

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// apiError is an answer of the admin API other than 2xx.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

// unauthorized reports whether err is the API's 401: no valid token.
func unauthorized(err error) bool {
	var e *apiError
	return errors.As(err, &e) && e.status == http.StatusUnauthorized
}

// recorder is the ResponseWriter the API answers the console through.
type recorder struct {
	status int
	header http.Header
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}

func (r *recorder) Write(b []byte) (int, error) {
	r.WriteHeader(http.StatusOK)
	return r.body.Write(b)
}

// call makes one call of the admin API in process, as token: body (if
// any) and the answer (into out, if any) are protojson.
func (c *Console) call(ctx context.Context, token, method, path string, body, out proto.Message) error {
	var b []byte
	if body != nil {
		var err error
		if b, err = protojson.Marshal(body); err != nil {
			return err
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	rec := &recorder{header: http.Header{}}
	c.api.ServeHTTP(rec, req)
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	if rec.status >= 300 {
		return answerError(method, path, rec)
	}
	if out == nil {
		return nil
	}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(rec.body.Bytes(), out); err != nil {
		return fmt.Errorf("the admin API's answer to %s %s: %w", method, apiPath(path), err)
	}
	return nil
}

// answerError reads the API's {"error": "..."} (or names the status).
func answerError(method, path string, rec *recorder) error {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(rec.body.Bytes(), &e) == nil && e.Error != "" {
		return &apiError{rec.status, e.Error}
	}
	return &apiError{rec.status, fmt.Sprintf("%s %s: %d %s", method, apiPath(path), rec.status, http.StatusText(rec.status))}
}

// apiPath is path without its query (which may hold an operator's name).
func apiPath(path string) string {
	p, _, _ := strings.Cut(path, "?")
	return p
}

// sinkPath is the API path of a sink's resource ("-" = every sink).
func sinkPath(sink string, rest ...string) string {
	if sink == "" {
		sink = "-"
	}
	p := "/v1/sinks/" + url.PathEscape(sink)
	for _, r := range rest {
		p += "/" + url.PathEscape(r)
	}
	return p
}

// collect gets page after page (the API's next_page_token) until the
// last one or max items; truncated reports stopping at max.
func collect[T any](max int, page func(token string) ([]T, string, error)) (all []T, truncated bool, err error) {
	for tok := ""; ; {
		items, next, err := page(tok)
		if err != nil {
			return nil, false, err
		}
		all = append(all, items...)
		if len(all) >= max {
			return all[:max], len(all) > max || next != "", nil
		}
		if next == "" {
			return all, false, nil
		}
		tok = next
	}
}

// failedMessages lists a sink's failed messages and blocked streams,
// every page, filtered by the API on q (stream, table).
func (c *Console) failedMessages(ctx context.Context, token, sink string, q url.Values) ([]*adminv1.FailedMessage, bool, error) {
	return collect(maxItems, func(pageToken string) ([]*adminv1.FailedMessage, string, error) {
		q := cloneValues(q)
		q.Set("page_size", "1000")
		if pageToken != "" {
			q.Set("page_token", pageToken)
		}
		var resp adminv1.ListFailedMessagesResponse
		if err := c.call(ctx, token, http.MethodGet, sinkPath(sink, "messages")+"?"+q.Encode(), nil, &resp); err != nil {
			return nil, "", err
		}
		return resp.Messages, resp.NextPageToken, nil
	})
}

// auditRecords reads a sink's audit, every page, and returns its last
// keep records, oldest first (payloads left out), and how many it holds.
func (c *Console) auditRecords(ctx context.Context, token, sink string, keep int) (last []*adminv1.AuditRecord, total int, err error) {
	q := url.Values{"page_size": {"1000"}}
	for {
		var resp adminv1.ListAuditRecordsResponse
		if err := c.call(ctx, token, http.MethodGet, sinkPath(sink, "audit")+"?"+q.Encode(), nil, &resp); err != nil {
			return nil, 0, err
		}
		for _, rec := range resp.Records {
			if m := rec.GetMessage(); m != nil {
				m.Payload, m.Headers = nil, nil
			}
		}
		total += len(resp.Records)
		last = append(last, resp.Records...)
		if len(last) > keep {
			last = append(last[:0:0], last[len(last)-keep:]...)
		}
		if resp.NextPageToken == "" {
			return last, total, nil
		}
		q.Set("page_token", resp.NextPageToken)
	}
}

func cloneValues(q url.Values) url.Values {
	out := url.Values{}
	for k, v := range q {
		out[k] = append([]string(nil), v...)
	}
	return out
}
