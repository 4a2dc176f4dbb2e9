// A wasi:http function in JavaScript, for wasmgate's tests: `?cache` counts calls in the `cache`
// capability, `?spin` loops past its timeout, `?hog` allocates past its memory cap, `?trap`
// throws; anything else answers a greeting with the path it was asked.
import { increment } from 'wasmgate:platform/cache@0.1.0';

function handle(request) {
  const url = new URL(request.url);
  const headers = { 'content-type': 'text/plain; charset=utf-8', 'x-written-in': 'javascript' };
  switch (url.search) {
    case '?cache':
      return new Response(`calls: ${increment('calls', 1n)}\n`, { headers });
    case '?spin':
      for (;;) {}
    case '?hog': {
      const hog = [];
      for (let i = 0; i < 1024; i++) hog.push(new Uint8Array(1024 * 1024).fill(1));
      return new Response(`held ${hog.length} MiB\n`, { headers });
    }
    case '?trap':
      throw new Error('asked to fail');
    default:
      return new Response(`hello from javascript at ${url.pathname}${url.search}\n`, { headers });
  }
}

addEventListener('fetch', (event) => event.respondWith(handle(event.request)));
