// Drives the real postgrest-js client against a running gatehouse and prints one JSON object on stdout:
// { "<step>": { "result": {data, error, count, status, statusText} | {thrown}, "wire": [exchange, ...] } }.
// The base URL and the API key come from COMPAT_BASE_URL and COMPAT_API_KEY. The assertions live in
// tests/test_compat_postgrest_js.py; this script only makes the calls, in order, and records what it got.
//
// Write steps only touch rows whose handle or title starts with "w-js-"; the seed rows are only read.

import { PostgrestClient } from '@supabase/postgrest-js'

const baseUrl = process.env.COMPAT_BASE_URL
const apiKey = process.env.COMPAT_API_KEY
if (!baseUrl || !apiKey) {
  console.error('set COMPAT_BASE_URL and COMPAT_API_KEY')
  process.exit(2)
}

const KEPT_HEADERS = ['content-range', 'content-type', 'content-profile', 'preference-applied', 'proxy-status']
let wire = []

// The client's own fetch, wrapped only to record the exchange (the client hides status details and headers).
async function recordingFetch(input, init = {}) {
  const response = await fetch(input, init)
  const requestHeaders = Object.fromEntries(new Headers(init.headers ?? {}).entries())
  const responseHeaders = {}
  for (const name of KEPT_HEADERS) {
    const value = response.headers.get(name)
    if (value !== null) responseHeaders[name] = value
  }
  wire.push({
    method: init.method ?? 'GET',
    url: String(input),
    requestHeaders,
    requestBody: typeof init.body === 'string' ? init.body : null,
    status: response.status,
    responseHeaders,
  })
  return response
}

const client = new PostgrestClient(baseUrl, { headers: { apikey: apiKey }, fetch: recordingFetch })
const results = {}

async function step(name, run) {
  wire = []
  try {
    const { data, error, count, status, statusText } = await run()
    results[name] = { result: { data, error, count, status, statusText }, wire }
  } catch (thrown) {
    results[name] = { result: { thrown: String(thrown?.stack ?? thrown) }, wire }
  }
}

const authors = () => client.from('authors')

// reads: filters
await step('eq', () => authors().select('id').eq('country', 'GB').order('id'))
await step('neq', () => authors().select('id').neq('country', 'GB').order('id'))
await step('gt', () => authors().select('id').gt('born', 1812).order('id'))
await step('gte_lte', () => authors().select('id').gte('born', 1812).lte('born', 1899).order('id'))
await step('in', () => authors().select('id').in('handle', ['calvino', 'austen', 'no,such']).order('id'))
await step('like', () => authors().select('id').like('name', '%Dick%'))
await step('ilike', () => authors().select('id').ilike('name', '%JANE%'))
await step('is_null', () => authors().select('id').is('born', null))
await step('not_is_null', () => authors().select('id').not('born', 'is', null).order('id'))
await step('or', () => authors().select('id').or('country.eq.AR,born.lt.1800').order('id'))
await step('not_in', () => authors().select('id').not('id', 'in', '(1,2,3)').order('id'))
await step('match', () => authors().select('id').match({ country: 'GB', born: 1812 }))
await step('filter', () => authors().select('id').filter('born', 'lt', 1800))
await step('text_search', () =>
  authors().select('id').textSearch('name', 'italo calvino', { type: 'plain', config: 'english' }))

// reads: shaping, embedding, order, paging
await step('alias', () => authors().select('who:name,handle').eq('id', 2))
await step('embed', () =>
  authors().select('id,name,books(*)').eq('id', 3).order('id', { referencedTable: 'books' }))
await step('embed_all', () =>
  authors().select('id,books(title)').order('id').order('title', { referencedTable: 'books', ascending: false }))
await step('embed_to_one', () =>
  client.from('books').select('title,author:authors(name,country)').in('id', [1, 3]).order('id'))
await step('embed_inner', () => authors().select('id,books!inner(title)').eq('books.title', 'Bleak House'))
await step('order_nulls_first', () => authors().select('id').order('born', { ascending: false, nullsFirst: true }))
await step('order_default', () => authors().select('id').order('born'))
await step('limit', () => authors().select('id').order('id').limit(2))
await step('range', () => authors().select('id').order('id').range(1, 3))
await step('range_past_end', () => authors().select('id').order('id').range(10, 19))

// reads: singular, csv, counts, strip nulls
await step('single', () => authors().select('*').eq('handle', 'borges').single())
await step('single_none', () => authors().select('*').eq('id', 99).single())
await step('single_many', () => authors().select('id').eq('country', 'GB').single())
await step('maybe_single_none', () => authors().select('*').eq('id', 99).maybeSingle())
await step('maybe_single_one', () => authors().select('id,name').eq('id', 1).maybeSingle())
await step('csv', () => authors().select('id,name,born').in('id', [1, 5]).order('id').csv())
await step('count_exact', () => authors().select('id', { count: 'exact' }).eq('country', 'GB').order('id'))
await step('count_head', () => authors().select('*', { count: 'exact', head: true }))
await step('count_page', () => client.from('books').select('id', { count: 'exact' }).order('id').range(0, 1))
await step('strip_nulls', () => authors().select('*').in('id', [1, 5]).order('id').stripNulls())

// writes (postgrest-js asks for return=minimal unless .select() is chained)
await step('insert_minimal', () => authors().insert({ handle: 'w-js-min', name: 'Js Minimal' }))
await step('insert', () => authors().insert({ handle: 'w-js-ins', name: 'Js Insert', born: 1950 }).select())
await step('insert_embed', () =>
  client.from('books').insert({ author_id: 1, title: 'w-js-book' }).select('title,authors(handle)'))
await step('bulk_insert', () =>
  authors()
    .insert([{ handle: 'w-js-b1', name: 'B1', country: 'NL' }, { handle: 'w-js-b2', name: 'B2' }], { count: 'exact' })
    .select('handle,country'))
await step('bulk_insert_defaults', () =>
  authors()
    .insert([{ handle: 'w-js-b3', name: 'B3', born: 2000 }, { handle: 'w-js-b4', name: 'B4' }],
      { defaultToNull: false })
    .select('handle,born,country'))
await step('upsert_merge', () =>
  authors().upsert({ handle: 'w-js-ins', name: 'Js Merged' }, { onConflict: 'handle' }).select('handle,name,born'))
await step('upsert_mixed', () =>
  authors()
    .upsert([{ handle: 'w-js-ins', name: 'Js Again' }, { handle: 'w-js-up', name: 'Js New' }], { onConflict: 'handle' })
    .select('handle,name'))
await step('upsert_ignore', () =>
  authors()
    .upsert([{ handle: 'w-js-ins', name: 'Ignored' }, { handle: 'w-js-up2', name: 'Js Two' }],
      { onConflict: 'handle', ignoreDuplicates: true })
    .select('handle,name'))
await step('update', () =>
  authors().update({ country: 'FR' }).like('handle', 'w-js-b%').select('handle,country').order('handle'))
await step('update_minimal', () => authors().update({ born: 1999 }).eq('handle', 'w-js-b1'))
await step('update_count', () => authors().update({ born: 1 }, { count: 'exact' }).like('handle', 'w-js-b%'))
await step('delete', () => authors().delete().eq('handle', 'w-js-b1').select('handle'))
await step('delete_count', () => authors().delete({ count: 'exact' }).like('handle', 'w-js-b%'))
await step('after_writes', () => authors().select('handle,name,born,country').like('handle', 'w-js-%').order('handle'))

// errors
await step('err_unique', () => authors().insert({ handle: 'austen', name: 'Twice' }))
await step('err_fk', () => client.from('books').insert({ author_id: 999, title: 'w-js-orphan' }))
await step('err_not_null', () => client.from('books').insert({ title: 'w-js-no-author' }))
await step('err_unknown_column', () => authors().insert({ handle: 'w-js-x', name: 'X', internal_note: 'n' }))
await step('err_bad_value', () => authors().select('id').eq('born', 'not a year'))
await step('err_unknown_table', () => client.from('nope').select('*'))
await step('err_rpc', () => client.rpc('nope', {}))
await step('err_rpc_get', () => client.rpc('nope', { a: 1 }, { get: true }))
const stranger = new PostgrestClient(baseUrl, { headers: { apikey: 'gh_not_a_real_key' }, fetch: recordingFetch })
await step('err_bad_key', () => stranger.from('authors').select('id'))

// schemas: postgrest-js sends a profile header only when a schema is chosen
await step('schema_v1', () => client.schema('v1').from('authors').select('id').eq('id', 3))
await step('schema_v1_write', () => client.schema('v1').from('authors').insert({ handle: 'w-js-v1', name: 'V1' }))
await step('schema_unknown', () => client.schema('v9').from('authors').select('id'))

process.stdout.write(JSON.stringify(results))
