package e2e

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// metrics is one scrape of kube-apiserver's /metrics.
type metrics map[string]*dto.MetricFamily

// scrape reads kube-apiserver's /metrics.
func (c *cluster) scrape() metrics {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, body := c.api.get(ctx, "/metrics")
	if code != 200 {
		c.t.Fatalf("/metrics: %d %s", code, lastLines(body, 3))
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		c.t.Fatalf("parse /metrics: %v", err)
	}
	return mfs
}

// labelsMatch reports whether m has every label in want.
func labelsMatch(m *dto.Metric, want map[string]string) bool {
	got := map[string]string{}
	for _, lp := range m.GetLabel() {
		got[lp.GetName()] = lp.GetValue()
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

// histogram is a cumulative histogram summed over the matching series.
type histogram struct {
	count   uint64
	sum     float64
	buckets map[float64]uint64 // upper bound -> cumulative count
}

// histogram sums the series of family name whose labels include want.
func (m metrics) histogram(name string, want map[string]string) histogram {
	h := histogram{buckets: map[float64]uint64{}}
	mf := m[name]
	if mf == nil {
		return h
	}
	for _, s := range mf.GetMetric() {
		if !labelsMatch(s, want) || s.GetHistogram() == nil {
			continue
		}
		hh := s.GetHistogram()
		h.count += hh.GetSampleCount()
		h.sum += hh.GetSampleSum()
		for _, b := range hh.GetBucket() {
			h.buckets[b.GetUpperBound()] += b.GetCumulativeCount()
		}
	}
	return h
}

// counter sums the counters (or histogram counts) of family name whose labels include want.
func (m metrics) counter(name string, want map[string]string) float64 {
	var v float64
	mf := m[name]
	if mf == nil {
		return 0
	}
	for _, s := range mf.GetMetric() {
		if !labelsMatch(s, want) {
			continue
		}
		switch {
		case s.GetCounter() != nil:
			v += s.GetCounter().GetValue()
		case s.GetHistogram() != nil:
			v += float64(s.GetHistogram().GetSampleCount())
		}
	}
	return v
}

// kmsCalls sums kube-apiserver's count of KMS gRPC calls whose method ends in method
// ("Encrypt", "Decrypt", "Status") with gRPC code code ("" for any).
func (m metrics) kmsCalls(method, code string) float64 {
	var v float64
	mf := m["apiserver_envelope_encryption_kms_operations_latency_seconds"]
	if mf == nil {
		return 0
	}
	for _, s := range mf.GetMetric() {
		l := map[string]string{}
		for _, lp := range s.GetLabel() {
			l[lp.GetName()] = lp.GetValue()
		}
		if strings.HasSuffix(l["method_name"], "/"+method) && (code == "" || l["grpc_status_code"] == code) {
			v += float64(s.GetHistogram().GetSampleCount())
		}
	}
	return v
}

// minus returns h - base (the observations made between two scrapes).
func (h histogram) minus(base histogram) histogram {
	d := histogram{count: h.count - base.count, sum: h.sum - base.sum, buckets: map[float64]uint64{}}
	for ub, c := range h.buckets {
		d.buckets[ub] = c - base.buckets[ub]
	}
	return d
}

// quantile estimates the q-quantile like Prometheus's histogram_quantile: linear
// interpolation inside the bucket that holds it. It also returns that bucket's upper
// bound, the only value the histogram really knows.
func (h histogram) quantile(q float64) (estimate, upper float64) {
	if h.count == 0 {
		return math.NaN(), math.NaN()
	}
	var bounds []float64
	for ub := range h.buckets {
		bounds = append(bounds, ub)
	}
	sort.Float64s(bounds)
	rank := q * float64(h.count)
	lower, prev := 0.0, uint64(0)
	for _, ub := range bounds {
		c := h.buckets[ub]
		if float64(c) >= rank {
			if math.IsInf(ub, 1) {
				return lower, ub
			}
			return lower + (ub-lower)*(rank-float64(prev))/float64(c-prev), ub
		}
		lower, prev = ub, c
	}
	return lower, math.Inf(1)
}

// mean returns the mean observation.
func (h histogram) mean() float64 { return h.sum / float64(h.count) }

// fmtSeconds prints a duration in seconds with a readable unit.
func fmtSeconds(s float64) string {
	if math.IsNaN(s) || math.IsInf(s, 0) {
		return fmt.Sprint(s)
	}
	return time.Duration(s * float64(time.Second)).Round(100 * time.Nanosecond).String()
}
