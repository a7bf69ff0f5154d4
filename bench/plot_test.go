package bench

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// latencyPoint is one change: when it committed and how long it took to be
// seen in S2.
type latencyPoint struct {
	commit time.Time
	ms     float64
}

// plotLatency draws commit → S2 latency over the run: per 100 ms of commit
// time its p50, p99 and max, on a log scale, with the targets as lines;
// written as a PNG to path.
func plotLatency(path, title string, pts []latencyPoint, p50Target, p99Target float64) error {
	if len(pts) == 0 {
		return fmt.Errorf("no points")
	}
	const bucket = 100 * time.Millisecond
	t0 := pts[0].commit
	byBucket := map[int][]float64{}
	last := 0
	for _, p := range pts {
		b := int(p.commit.Sub(t0) / bucket)
		byBucket[b] = append(byBucket[b], p.ms)
		last = max(last, b)
	}
	var p50, p99, worst plotter.XYs
	for b := 0; b <= last; b++ {
		ms := byBucket[b]
		if len(ms) == 0 {
			continue
		}
		sort.Float64s(ms)
		x := float64(b) * bucket.Seconds()
		at := func(q float64) float64 { return math.Max(ms[min(len(ms)-1, int(q*float64(len(ms))))], 0.1) }
		p50 = append(p50, plotter.XY{X: x, Y: at(0.5)})
		p99 = append(p99, plotter.XY{X: x, Y: at(0.99)})
		worst = append(worst, plotter.XY{X: x, Y: math.Max(ms[len(ms)-1], 0.1)})
	}
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "commit time since the load started (s)"
	p.Y.Label.Text = "commit → seen in S2 (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = ticks125{}
	p.Add(plotter.NewGrid())
	for _, s := range []struct {
		name string
		xys  plotter.XYs
		c    color.RGBA
	}{{"max per 100 ms", worst, color.RGBA{200, 200, 200, 255}}, {"p99 per 100 ms", p99, color.RGBA{230, 120, 20, 255}},
		{"p50 per 100 ms", p50, color.RGBA{30, 90, 200, 255}}} {
		l, err := plotter.NewLine(s.xys)
		if err != nil {
			return err
		}
		l.Color = s.c
		l.Width = vg.Points(1.2)
		p.Add(l)
		p.Legend.Add(s.name, l)
	}
	end := float64(last+1) * bucket.Seconds()
	for _, tg := range []struct {
		name string
		ms   float64
	}{{"p50 target", p50Target}, {"p99 target", p99Target}} {
		if tg.ms <= 0 {
			continue
		}
		l, err := plotter.NewLine(plotter.XYs{{X: 0, Y: tg.ms}, {X: end, Y: tg.ms}})
		if err != nil {
			return err
		}
		l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		l.Color = color.RGBA{120, 120, 120, 255}
		p.Add(l)
		p.Legend.Add(fmt.Sprintf("%s %.0f ms", tg.name, tg.ms), l)
	}
	p.Legend.Top = true
	return p.Save(9*vg.Inch, 4*vg.Inch, path)
}

// benchDocs is where benchmarks put their pictures: the repository's
// docs/ (PGS2_BENCH_DOCS elsewhere).
func benchDocs() string {
	if d := os.Getenv("PGS2_BENCH_DOCS"); d != "" {
		return d
	}
	return filepath.Join("..", "docs")
}

// ticks125 marks a log axis at 1, 2 and 5 times the powers of ten.
type ticks125 struct{}

func (ticks125) Ticks(lo, hi float64) []plot.Tick {
	var out []plot.Tick
	for e := math.Floor(math.Log10(lo)); math.Pow(10, e) <= hi; e++ {
		for _, m := range []float64{1, 2, 5} {
			if v := m * math.Pow(10, e); v >= lo && v <= hi {
				out = append(out, plot.Tick{Value: v, Label: strconv.FormatFloat(v, 'g', -1, 64)})
			}
		}
	}
	return out
}
