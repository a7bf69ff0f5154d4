package delivery_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/console"
	"github.com/pgs2/pgs2/pkg/delivery"
)

const chromium = "/usr/bin/chromium"

// TestConsole drives the web console in a real browser (headless
// Chromium) against a running pipeline whose admin API needs a token: log
// in; a parked message shows with its error; once the cause is fixed,
// retry delivers it and it leaves the list; another is acknowledged with a
// reason, leaves the list, and the audit shows who and why; pause stops
// the sink and resume delivers what waited. With PGS2_SCREENSHOTS=1 it
// saves the pages to docs/console-*.png.
func TestConsole(t *testing.T) {
	b := newBrowser(t)
	const token = "console-admin-token-5f3a9c71"
	p := newPipeline(t, `CREATE TABLE ratios (id int PRIMARY KEY, d int NOT NULL, body text)`, []string{"public.ratios"}, "app-basin")
	byHand := config.Retry{Initial: config.Duration(time.Hour), Max: config.Duration(time.Hour)} // parked messages wait for the operator
	p.sinks = []config.Sink{
		{Name: "ratios", Tables: []string{"public.ratios"}, Basin: "app-basin", Stream: "ratios", Retry: byHand,
			Transform: `{"id": record.id, "inv": 100 / record.d, "body": record.body}`},
		{Name: "copy", Tables: []string{"public.ratios"}, Basin: "app-basin", Stream: "copy", Filter: `record.id != 3`},
	}
	p.start(t)
	b.base = consoleServer(t, p, token)
	p.pg.MustExec(t, "app", `INSERT INTO ratios VALUES (1, 4, 'fine')`)
	p.pg.MustExec(t, "app", `INSERT INTO ratios VALUES (2, 0, 'divides by zero')`)        // the transform fails
	p.pg.MustExec(t, "app", `INSERT INTO ratios VALUES (3, 1, repeat('x', 2*1024*1024))`) // too large for S2
	p.records(t, "app-basin", "ratios", 1)
	ps, err := p.js.Stream(context.Background(), delivery.ParkedStream)
	if err != nil {
		t.Fatal(err)
	}
	if n := waitParked(t, ps, 2); n != 2 {
		t.Fatalf("park holds %d messages, want 2", n)
	}

	// (1) The API answers 401: the login form. A wrong token is refused.
	b.do(chromedp.Navigate(b.base+"/console/"), chromedp.WaitVisible(chromedp.ID("token")))
	b.do(chromedp.SetValue(chromedp.ID("token"), "not-the-token"), chromedp.Click(chromedp.ID("login")),
		chromedp.WaitVisible(flash("does not take this token")))
	b.do(chromedp.SetValue(chromedp.ID("token"), token), chromedp.SetValue(chromedp.ID("operator"), "ada"),
		chromedp.Click(chromedp.ID("login")), chromedp.WaitVisible(flash("logged in as ada")), chromedp.WaitVisible(chromedp.ID("overview")))
	b.noToken(token)
	if got := b.text(`[data-sink-state="ratios"]`); got != "active" {
		t.Errorf("ratios is %q on the overview", got)
	}
	if got := b.text(`#sink-ratios .stats`); !strings.Contains(got, "2 msgs in 2 groups") {
		t.Errorf("ratios' parked messages on the overview: %q", got)
	}
	if os.Getenv("PGS2_SCREENSHOTS") == "1" { // with the slot sampled (every 5 s)
		for deadline := time.Now().Add(15 * time.Second); strings.Contains(b.text("#sources"), "slot error") && time.Now().Before(deadline); {
			time.Sleep(500 * time.Millisecond)
			b.do(chromedp.Navigate(b.base+"/console/"), chromedp.WaitVisible(chromedp.ID("sources")))
		}
		b.screenshot("overview")
	}

	// (2) Both parked messages are listed with their errors; a filter the
	// API lacks (age) is applied by the console.
	b.do(chromedp.Navigate(b.base+"/console/messages?sink=ratios"), chromedp.WaitVisible(chromedp.CSS(`#parked tr[data-id]`)))
	if got := b.text("#parked"); !strings.Contains(got, "division by zero") || !strings.Contains(got, "1 MiB") {
		t.Fatalf("parked messages:\n%s", got)
	}
	b.screenshot("messages")
	b.do(chromedp.Navigate(b.base+"/console/messages?sink=ratios&older_than=60"), chromedp.WaitVisible(chromedp.CSS(".empty-parked")))

	// (3) The message, with its error and payload; after the fix, retry
	// delivers it and it leaves the list.
	b.do(chromedp.Navigate(b.base+"/console/messages?sink=ratios"),
		chromedp.Click(chromedp.Search(`//table[@id="parked"]//tr[contains(., "division by zero")]//a`)),
		chromedp.WaitVisible(chromedp.ID("payload")))
	if got := b.text("#last-error"); !strings.Contains(got, "division by zero") {
		t.Errorf("last error: %q", got)
	}
	if got := b.text("#payload"); !strings.Contains(got, `"divides by zero"`) {
		t.Errorf("payload: %q", got)
	}
	b.screenshot("message")
	fixed := slices.Clone(p.sinks)
	fixed[0].Transform = `{"id": record.id, "inv": record.d == 0 ? 0 : 100 / record.d, "body": record.body}`
	if restart, err := p.delivery.Reload(fixed); err != nil || len(restart) != 0 {
		t.Fatalf("Reload of the fixed transform: %v %v", restart, err)
	}
	b.do(chromedp.Click(chromedp.ID("retry")), chromedp.WaitVisible(flash("retrying message")))
	if recs := p.records(t, "app-basin", "ratios", 2); recs[1].Raw != `{"body":"divides by zero","id":2,"inv":0}` {
		t.Errorf("the retried record: %s", recs[1].Raw)
	}
	b.waitListed("division by zero", false)

	// (4) The oversized one is acknowledged with a reason: gone, audited.
	b.do(chromedp.Click(chromedp.Search(`//table[@id="parked"]//tr[contains(., "1 MiB")]//a`)), chromedp.WaitVisible(chromedp.ID("ack-reason")))
	if got := b.text("#message"); !strings.Contains(got, "too large to show whole") {
		t.Errorf("a 2 MiB payload is not said to be cut:\n%.500s", got)
	}
	b.do(chromedp.SetValue(chromedp.ID("ack-reason"), "row too large; fixed at the source"), chromedp.Click(chromedp.ID("ack")),
		chromedp.WaitVisible(flash("acknowledged")), chromedp.WaitVisible(chromedp.CSS(".empty-parked")))
	b.do(chromedp.Navigate(b.base+"/console/audit"), chromedp.WaitVisible(chromedp.CSS(`tr[data-kind="ack"]`)))
	if got := b.text(`tr[data-kind="ack"]`); !strings.Contains(got, "ada") || !strings.Contains(got, "row too large; fixed at the source") {
		t.Errorf("the audit's ack: %q", got)
	}

	// (5) Pause: nothing more reaches S2 (the router still routes: copy
	// gets it); resume delivers what waited.
	sinkForm := `form[data-sink="ratios"]`
	b.do(chromedp.Navigate(b.base+"/console/"), chromedp.WaitVisible(chromedp.CSS(sinkForm)),
		chromedp.SetValue(chromedp.CSS(sinkForm+` input[name="reason"]`), "maintenance window"),
		chromedp.Click(chromedp.CSS(sinkForm+` button[value="pause"]`)), chromedp.WaitVisible(flash("sink ratios is paused now")))
	if got := b.text(`[data-sink-state="ratios"]`); got != "paused" {
		t.Fatalf("ratios is %q after pause", got)
	}
	time.Sleep(time.Second) // every delivery process stops the sink within a second
	p.pg.MustExec(t, "app", `INSERT INTO ratios VALUES (4, 2, 'during the pause')`)
	p.records(t, "app-basin", "copy", 3)
	time.Sleep(500 * time.Millisecond) // what ratios would have got by now
	p.recordsWithin(t, "app-basin", "ratios", 2, 0)
	b.do(chromedp.Click(chromedp.CSS(sinkForm+` button[value="resume"]`)), chromedp.WaitVisible(flash("sink ratios is active now")))
	if recs := p.records(t, "app-basin", "ratios", 3); !strings.Contains(recs[2].Raw, "during the pause") {
		t.Errorf("after resume: %s", recs[2].Raw)
	}

	b.do(chromedp.Navigate(b.base+"/console/audit"), chromedp.WaitVisible(chromedp.CSS(`tr[data-kind="sink resume"]`)))
	if got := b.text("#audit"); !strings.Contains(got, "sink pause") || !strings.Contains(got, "maintenance window") || !strings.Contains(got, "retry") {
		t.Errorf("audit:\n%s", got)
	}
	b.screenshot("audit")
	b.noToken(token)
}

// consoleServer serves the admin API, needing token, and the console on
// one mux, as delivery does on --http-addr.
func consoleServer(t *testing.T, p *pipeline, token string) string {
	t.Helper()
	admin, err := delivery.NewAdmin(context.Background(), p.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	admin.SetSinks(p.sinks)
	admin.RequireTokens(map[string]string{token: ""})
	mux := http.NewServeMux()
	admin.Register(mux)
	console.New(mux, quiet()).Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL
}

// browser is a headless Chromium tab.
type browser struct {
	t    *testing.T
	ctx  context.Context
	base string
}

// newBrowser starts Chromium; without it the test is skipped (failed in CI).
func newBrowser(t *testing.T) *browser {
	t.Helper()
	if _, err := os.Stat(chromium); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is missing: the browser test needs it (apt-get install chromium)", chromium)
		}
		t.Skipf("%s is missing: install chromium to run the browser test", chromium)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.Headless,
		chromedp.Flag("disable-gpu", true), chromedp.Flag("disable-dev-shm-usage", true), chromedp.WindowSize(1280, 900))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelTab(); cancelAlloc() })
	if err := chromedp.Do(ctx); err != nil { // start it now
		t.Fatalf("start %s: %v", chromium, err)
	}
	return &browser{t: t, ctx: ctx}
}

// do runs steps, each within 20 s.
func (b *browser) do(steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	for i, s := range steps {
		ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
		err := chromedp.Do(ctx, s)
		cancel()
		if err != nil {
			loc, _ := chromedp.Run(b.ctx, chromedp.Location())
			page, _ := chromedp.Run(b.ctx, chromedp.Text(chromedp.CSS("main")))
			b.t.Fatalf("browser step %d: %v (at %s):\n%.2000s", i+1, err, loc, page)
		}
	}
}

// text is the visible text of the first element css selects.
func (b *browser) text(css string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(css)))
	if err != nil {
		b.t.Fatalf("text of %s: %v", css, err)
	}
	return strings.TrimSpace(s)
}

// flash selects the flash message that holds text.
func flash(text string) chromedp.Search {
	return chromedp.Search(`//div[contains(@class, "flash") and contains(., "` + text + `")]`)
}

// waitListed reloads the ratios messages until a row holds needle (listed)
// or none does.
func (b *browser) waitListed(needle string, listed bool) {
	b.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		b.do(chromedp.Navigate(b.base+"/console/messages?sink=ratios"), chromedp.WaitVisible(chromedp.ID("parked")))
		if strings.Contains(b.text("#parked"), needle) == listed {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("after 15 s, %q is listed: %v, want %v", needle, !listed, listed)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// noToken checks that neither the page nor a cookie holds the token, and
// that the session cookie is HttpOnly and SameSite=Strict.
func (b *browser) noToken(token string) {
	b.t.Helper()
	html, err := chromedp.Run(b.ctx, chromedp.OuterHTML(chromedp.CSS("html")))
	if err != nil {
		b.t.Fatal(err)
	}
	if strings.Contains(html, token) {
		b.t.Error("the page holds the admin token")
	}
	res, err := chromedp.Call(b.ctx, network.GetCookies, network.GetCookiesParams{URLs: []string{b.base + "/console/"}})
	if err != nil {
		b.t.Fatal(err)
	}
	session := false
	for _, c := range res.Cookies {
		if strings.Contains(c.Value, token) {
			b.t.Errorf("cookie %s holds the admin token", c.Name)
		}
		if c.Name == "pgs2_console_session" {
			session = c.HTTPOnly && c.SameSite == network.CookieSameSiteStrict && c.Path == "/console"
		}
	}
	if !session {
		b.t.Errorf("no HttpOnly, SameSite=Strict session cookie: %+v", res.Cookies)
	}
}

// screenshot saves the whole page to docs/console-name.png when
// PGS2_SCREENSHOTS=1.
func (b *browser) screenshot(name string) {
	b.t.Helper()
	if os.Getenv("PGS2_SCREENSHOTS") != "1" {
		return
	}
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile("../../docs/console-"+name+".png", png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}
