package console

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// funcs are the templates' helpers.
var funcs = template.FuncMap{
	"ts":          tsText,
	"ago":         ago,
	"secs":        func(s float64) string { return durText(time.Duration(s * float64(time.Second))) },
	"measured":    func(lag float64) bool { return lag >= 0 }, // the API's -1: not measured
	"size":        sizeText,
	"s2err":       s2errText,
	"path":        url.PathEscape,
	"dash":        dash,
	"messagesURL": messagesURL,
	"messageURL":  messageURL,
	"actions":     actionsFor,
	"title":       title,
}

// title capitalizes an ASCII word (a sink action).
func title(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// unset reports a timestamp that is missing or zero.
func unset(t *timestamppb.Timestamp) bool { return t == nil || (t.Seconds == 0 && t.Nanos == 0) }

func tsText(t *timestamppb.Timestamp) string {
	if unset(t) {
		return "-"
	}
	return t.AsTime().UTC().Format("2006-01-02 15:04:05 UTC")
}

// ago is how long before now t was ("-" when unset).
func ago(now time.Time, t *timestamppb.Timestamp) string {
	if unset(t) {
		return "-"
	}
	return durText(max(0, now.Sub(t.AsTime()))) + " ago"
}

func durText(d time.Duration) string {
	switch {
	case d < time.Second:
		return fmt.Sprintf("%d ms", d.Milliseconds())
	case d < time.Minute:
		return fmt.Sprintf("%.1f s", d.Seconds())
	case d < time.Hour:
		return fmt.Sprintf("%d min %d s", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h %d min", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%d days", int(d.Hours()/24))
}

// sizeText writes a byte count (int64 or uint64) as KiB, MiB, GiB.
func sizeText(n any) string {
	var b float64
	switch v := n.(type) {
	case int64:
		b = float64(v)
	case uint64:
		b = float64(v)
	case int:
		b = float64(v)
	}
	for _, u := range []string{"B", "KiB", "MiB", "GiB"} {
		if b < 1024 || u == "GiB" {
			if u == "B" {
				return fmt.Sprintf("%.0f B", b)
			}
			return fmt.Sprintf("%.1f %s", b, u)
		}
		b /= 1024
	}
	return ""
}

// s2errText is a delivery error as pgs2ctl writes it: status code: message.
func s2errText(e *adminv1.DeliveryError) string {
	if e == nil {
		return ""
	}
	if e.HttpStatus == 0 && e.Code == "" {
		return e.Message
	}
	if e.HttpStatus == 0 {
		return e.Code + ": " + e.Message
	}
	return strings.TrimSpace(fmt.Sprintf("%d %s", e.HttpStatus, e.Code)) + ": " + e.Message
}

// actionsFor are the state changes that apply to a sink in state: resume
// undoes a pause, enable a disable.
func actionsFor(state string) []string {
	switch state {
	case "paused":
		return []string{"resume", "disable"}
	case "disabled":
		return []string{"enable"}
	}
	return []string{"pause", "disable"}
}

// clip cuts s to at most n bytes (on a rune boundary), marked.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + " … (cut)"
}

// payloadView is a payload as a page shows it: pretty JSON, else text,
// else base64, at most maxPayload bytes of it.
type payloadView struct {
	Text      string
	Kind      string // JSON, text or base64
	Size      int    // the payload's bytes
	Truncated bool
	Max       int
}

func viewPayload(b []byte) payloadView {
	v := payloadView{Size: len(b), Max: maxPayload}
	var pretty bytes.Buffer
	switch {
	case len(b) > 0 && json.Indent(&pretty, b, "", "  ") == nil:
		v.Kind, v.Text = "JSON", pretty.String()
	case utf8.Valid(b):
		v.Kind, v.Text = "text", string(b)
	default:
		v.Kind, v.Text = "base64", base64.StdEncoding.EncodeToString(b)
	}
	if len(v.Text) > maxPayload {
		v.Text, v.Truncated = strings.ToValidUTF8(v.Text[:maxPayload], ""), true
	}
	return v
}
