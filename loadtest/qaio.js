// k6 load test of the Qwen All-in-One stack: weighted sentiment / chat / analyze traffic built from
// real reviews, named checks, and thresholds that fail the run.
//   k6 run -e QAIO_URL=http://127.0.0.1:8080 -e QAIO_REVIEWS=/path/waimai_10k.csv --vus 8 --duration 30s qaio.js
import http from 'k6/http';
import { check } from 'k6';
import { Rate } from 'k6/metrics';
import { SharedArray } from 'k6/data';

const BASE = __ENV.QAIO_URL || 'http://127.0.0.1:8080';
// A stack with API keys (compose, Kubernetes) needs one: -e QAIO_API_KEY=... (give it a high rate= and conn=).
const AUTH = __ENV.QAIO_API_KEY ? { Authorization: `Bearer ${__ENV.QAIO_API_KEY}` } : {};
const CHAT_TOKENS = parseInt(__ENV.QAIO_CHAT_TOKENS || '32', 10);
const POOL = parseInt(__ENV.QAIO_TEXT_POOL || '500', 10); // a pool: popular texts repeat, as in life
// Task weights, in percent of requests: sentiment, chat, analyze.
const WEIGHTS = (__ENV.QAIO_WEIGHTS || '70,20,10').split(',').map(Number);

const reviews = new SharedArray('reviews', () => {
  // k6 resolves a relative path against this script: the shared data set beside the checkout.
  const lines = open(__ENV.QAIO_REVIEWS || '../../shared/data/waimai_10k.csv').split('\n').slice(1);
  const texts = [];
  for (const line of lines) {
    const comma = line.indexOf(',');
    const text = line.slice(comma + 1).trim().replace(/^"|"$/g, '');
    if (comma > 0 && text) texts.push(text);
    if (texts.length >= POOL) break;
  }
  return texts;
});

const cacheHits = new Rate('cache_hits');
// 5xx among the answers that count for availability (429s are the client's pacing: left out).
const serverErrors = new Rate('server_errors');
// The SLA's latency percentile (QAIO_SLO_LATENCY_SHARE as a percentile; loadtest/run.py sets it).
const SLA_STAT = `p(${__ENV.QAIO_SLA_PERCENTILE || '95'})`;

function answered(res) {
  if (res.status !== 429) serverErrors.add(res.status >= 500 || res.status === 0);
  return res;
}

export const options = {
  summaryTrendStats: [...new Set(['avg', 'min', 'p(50)', 'p(90)', 'p(95)', 'p(99)', SLA_STAT, 'max'])],
  thresholds: {
    http_req_failed: [`rate<${__ENV.QAIO_MAX_ERROR_RATE || '0.01'}`],
    checks: ['rate>0.99'],
    'http_req_duration{task:sentiment}': [`p(95)<${__ENV.QAIO_P95_SENTIMENT_MS || '15000'}`],
    'http_req_duration{task:chat}': [`p(95)<${__ENV.QAIO_P95_CHAT_MS || '120000'}`],
    'http_req_duration{task:analyze}': [`p(95)<${__ENV.QAIO_P95_CHAT_MS || '120000'}`],
  },
};

const params = (task) => ({
  headers: { 'Content-Type': 'application/json', ...AUTH },
  tags: { task },
  timeout: '180s',
});

function pickTask() {
  const roll = Math.random() * WEIGHTS.reduce((a, b) => a + b, 0);
  if (roll < WEIGHTS[0]) return 'sentiment';
  return roll < WEIGHTS[0] + WEIGHTS[1] ? 'chat' : 'analyze';
}

export default function () {
  const text = reviews[Math.floor(Math.random() * reviews.length)];
  const task = pickTask();
  if (task === 'sentiment') {
    const res = answered(http.post(`${BASE}/v1/sentiment`, JSON.stringify({ text }), params(task)));
    cacheHits.add(res.headers['X-Cache-Status'] === 'HIT');
    check(res, {
      'sentiment: status 200': (r) => r.status === 200,
      'sentiment: has a label': (r) => r.status === 200 && ['positive', 'negative', 'neutral'].includes(r.json('sentiment.label')),
    });
  } else if (task === 'chat') {
    const body = { messages: [{ role: 'user', content: text }], max_tokens: CHAT_TOKENS };
    const res = answered(http.post(`${BASE}/v1/chat`, JSON.stringify(body), params(task)));
    check(res, {
      'chat: status 200': (r) => r.status === 200,
      'chat: has a reply': (r) => r.status === 200 && typeof r.json('reply') === 'string',
    });
  } else {
    const res = answered(http.post(`${BASE}/v1/analyze`, JSON.stringify({ text, max_tokens: CHAT_TOKENS }), params(task)));
    check(res, {
      'analyze: status 200': (r) => r.status === 200,
      'analyze: has label and reply': (r) => r.status === 200 && !!r.json('sentiment.label') && typeof r.json('reply') === 'string',
    });
  }
}

export function handleSummary(data) {
  const out = { stdout: `k6: ${data.metrics.http_reqs ? data.metrics.http_reqs.values.count : 0} requests\n` };
  if (__ENV.QAIO_SUMMARY) out[__ENV.QAIO_SUMMARY] = JSON.stringify(data, null, 2);
  return out;
}
