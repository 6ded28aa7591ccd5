// k6 overload step: more concurrent clients than the stack can hold, each VU on its own source
// address (run with --local-ips), so per-address rate limits do not hide the overload. Every answer
// must be 200, 429 or 503; every 429/503 must carry Retry-After, which the client then honours (a
// well-behaved client: QAIO_HONOR_RETRY_AFTER=0 makes it hammer instead).
//   k6 run --local-ips 127.0.1.1-127.0.4.250 -e QAIO_URL=http://127.0.0.1:8080 -e QAIO_VUS=480 -e QAIO_DURATION=30s overload.js
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const BASE = __ENV.QAIO_URL || 'http://127.0.0.1:8080';
const AUTH = __ENV.QAIO_API_KEY ? { Authorization: `Bearer ${__ENV.QAIO_API_KEY}` } : {};  // stacks with API keys
const CHAT_TOKENS = parseInt(__ENV.QAIO_CHAT_TOKENS || '32', 10);
const HONOR_RETRY_AFTER = (__ENV.QAIO_HONOR_RETRY_AFTER || '1') === '1';
const CLIENT_TIMEOUT = __ENV.QAIO_CLIENT_TIMEOUT || '60s'; // a client that gives up abandons its request

const admitted = new Trend('admitted_duration', true); // latency of the requests answered 200
const shed = new Trend('shed_duration', true); // how fast a 429/503 came back
const deliveredTokens = new Counter('delivered_tokens'); // completion tokens in 200 answers not from the cache
const statusCount = {};
for (const s of ['200', '429', '503', 'other', 'abandoned']) statusCount[s] = new Counter(`status_${s}`);

export const options = {
  // Requests still running when the step ends are let finish (up to the longest deadline): k6 cutting
  // them off would abandon them, and their work would count as done for nobody.
  scenarios: {
    overload: {
      executor: 'constant-vus', vus: parseInt(__ENV.QAIO_VUS || '10', 10), duration: __ENV.QAIO_DURATION || '30s',
      gracefulStop: __ENV.QAIO_GRACEFUL_STOP || '130s',
    },
  },
  summaryTrendStats: ['avg', 'min', 'p(50)', 'p(90)', 'p(99)', 'max'],
  thresholds: {
    'checks{check:status is 200 or 429 or 503}': ['rate>0.999'],
    'checks{check:a refusal carries Retry-After}': ['rate>0.999'],
    status_other: ['count<1'],
  },
  noConnectionReuse: false,
};

export default function () {
  const chat = Math.random() < 0.5;
  const path = chat ? '/v1/chat' : '/v1/sentiment';
  // Chat texts are sampled (temperature 0.7): the cache cannot answer them, every one costs the model.
  const body = chat ? { text: `overload ${__VU}-${__ITER}`, max_tokens: CHAT_TOKENS }
    : { text: `过载测试 ${__VU}-${__ITER}` };
  const res = http.post(`${BASE}${path}`, JSON.stringify(body), {
    headers: { 'Content-Type': 'application/json', ...AUTH }, timeout: CLIENT_TIMEOUT, tags: { task: chat ? 'chat' : 'sentiment' },
  });
  if (res.status === 0 && res.error_code === 1050) {
    statusCount.abandoned.add(1); // the client's own timeout (k6's error 1050): it left
    return;
  }
  const known = [200, 429, 503].includes(res.status);
  (known ? statusCount[String(res.status)] : statusCount.other).add(1);
  check(res, { 'status is 200 or 429 or 503': (r) => known });
  if (res.status === 200) {
    admitted.add(res.timings.duration);
    if (chat && res.headers['X-Cache-Status'] !== 'HIT') deliveredTokens.add(res.json('usage.completion_tokens'));
    return;
  }
  if (res.status === 429 || res.status === 503) {
    shed.add(res.timings.duration);
    const retryAfter = parseFloat(res.headers['Retry-After']);
    check(res, { 'a refusal carries Retry-After': () => retryAfter >= 0 });
    if (HONOR_RETRY_AFTER && retryAfter > 0) sleep(retryAfter * (0.5 + Math.random())); // jittered
  }
}

export function handleSummary(data) {
  const out = { stdout: `k6 overload: ${data.metrics.http_reqs ? data.metrics.http_reqs.values.count : 0} requests\n` };
  if (__ENV.QAIO_SUMMARY) out[__ENV.QAIO_SUMMARY] = JSON.stringify(data, null, 2);
  return out;
}
