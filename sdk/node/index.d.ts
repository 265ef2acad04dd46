// Types of the flowpool client as `require('flowpool')` gives it (index.cjs): the Flowpool class, which carries
// every other name of the package as a property (`Flowpool.Maitai`, `Flowpool.APIError`, `Flowpool.default`),
// hence `export =` and a namespace merged into the class. index.d.mts types `import` (index.mjs): the same
// objects, as its default export and named exports.

declare class Flowpool {
  constructor(options?: Flowpool.ClientOptions);
  readonly apiKey: string | null;
  readonly baseURL: string;
  readonly timeout: number;
  readonly maxRetries: number;
  readonly defaultHeaders: Record<string, string>;
  workflow: Flowpool.WorkflowResource;
  workflows: Flowpool.Workflows;
  runs: Flowpool.Runs;
  /** A client like this one with some options changed. */
  withOptions(options?: Flowpool.ClientOptions): this;
  /** The class itself, for code compiled from a default import (`import Flowpool from 'flowpool'`). */
  static readonly default: typeof Flowpool;
}

// Inside the namespace `Flowpool` names its member (`Flowpool.Flowpool`, the class again): this alias reaches it.
import FlowpoolClass = Flowpool;

declare namespace Flowpool {
  /** The class itself: `const { Flowpool } = require('flowpool')`. */
  export import Flowpool = FlowpoolClass;

  export type Role = 'system' | 'user' | 'assistant' | 'tool' | (string & {});

  export interface ChatMessage {
    role: Role;
    content: string | null | Array<Record<string, unknown>>;
    [key: string]: unknown;
  }

  export interface ClientOptions {
    /** The account's key; default FLOWPOOL_API_KEY (Maitai: MAITAI_API_KEY first). */
    apiKey?: string | null;
    /**
     * The API's URL; default FLOWPOOL_BASE_URL, FLOWPOOL_API_URL (Maitai: MAITAI_BASE_URL first),
     * then http://127.0.0.1:8080.
     */
    baseURL?: string;
    /** Milliseconds one try may take: for a stream, until its answer starts. Default 660000. */
    timeout?: number;
    /** Tries after the first, where a retry is safe. Default 2. */
    maxRetries?: number;
    /** Headers sent with every request. */
    defaultHeaders?: Record<string, string>;
    /** The fetch to use; default the platform's. */
    fetch?: typeof fetch;
  }

  export interface RequestOptions {
    /** Aborts the request, and a stream going on: the call throws APIUserAbortError. */
    signal?: AbortSignal;
    /** Milliseconds this call's tries may take, over the client's. */
    timeout?: number;
    /** Tries after the first for this call, over the client's. */
    maxRetries?: number;
    /** Headers for this call. */
    headers?: Record<string, string>;
  }

  export interface InvokeOptions extends RequestOptions {
    /** Names this call across its retries and processes; a new one per call when not given. */
    idempotencyKey?: string;
  }

  export interface CompletionCreateParamsBase {
    /** `workflow:<name>`, or `workflow:<name>@<version>` for one version. */
    model: string;
    messages?: ChatMessage[];
    input?: unknown;
    /** Values the run reads as ctx.secrets, never stored. */
    secrets?: Record<string, string>;
    session_id?: string;
    metadata?: Record<string, unknown>;
    [param: string]: unknown;
  }

  export interface CompletionCreateParamsNonStreaming extends CompletionCreateParamsBase {
    stream?: false | null;
  }

  export interface CompletionCreateParamsStreaming extends CompletionCreateParamsBase {
    stream: true;
  }

  export type CompletionCreateParams = CompletionCreateParamsNonStreaming | CompletionCreateParamsStreaming;

  export interface Usage {
    prompt_tokens: number;
    completion_tokens: number;
    total_tokens: number;
    [key: string]: unknown;
  }

  export interface ChatCompletionChoice {
    index: number;
    message: { role: 'assistant'; content: string | null; [key: string]: unknown };
    /** On the completion that ends a stream: the same as `message`. */
    delta?: { role: 'assistant'; content: string | null; [key: string]: unknown };
    finish_reason: string | null;
  }

  export interface ChatCompletion {
    id: string;
    object: 'chat.completion';
    created: number;
    model: string;
    choices: ChatCompletionChoice[];
    usage: Usage;
    /** The run's id: `client.runs.get(request_id)` has everything kept of it. */
    request_id: string;
    session_id: string;
    /** What the script returned, as it returned it. */
    output: unknown;
    [key: string]: unknown;
  }

  /** What a script emitted with `ctx.emit(type, content)`, as it ran. */
  export interface WorkflowChunk {
    object: 'workflow.chunk';
    type: string;
    content: unknown;
    index: number;
    request_id: string;
    choices?: undefined;
  }

  /** A log line of a run, when its stream was asked for with `logs: true`. */
  export interface WorkflowLog {
    object: 'workflow.log';
    level: string;
    msg: string;
    time: number;
    fields?: Record<string, unknown>;
    index?: number;
    request_id: string;
  }

  export type StreamEvent = WorkflowChunk | ChatCompletion;

  /** Server-sent events as an async iterable; iterate it once. */
  export class Stream<T = StreamEvent> implements AsyncIterable<T> {
    /** The answer the events are read from. */
    readonly response: Response | undefined;
    /** The run's id, from the answer's X-Request-Id. */
    readonly requestId: string | undefined;
    /** `abort()` ends the stream: its iteration throws APIUserAbortError. */
    readonly controller: { abort(): void };
    [Symbol.asyncIterator](): AsyncIterator<T>;
  }

  /** A promise of a Stream that can also be iterated at once. */
  export type StreamPromise<T = StreamEvent> = Promise<Stream<T>> & AsyncIterable<T>;

  export interface Run {
    request_id: string;
    status: string;
    [key: string]: unknown;
  }

  export interface Page<T> {
    data: T[];
    pagination: { total: number; offset: number; limit: number };
  }

  export interface PageParams {
    offset?: number;
    limit?: number;
  }

  export interface UploadParams {
    workflow_ref_name: string;
    /** The workflow's Python source. */
    script: string;
    description?: string;
    timeout_seconds?: number;
    cache_ttl_seconds?: number;
    application_name?: string;
    env?: Record<string, string>;
    version_notes?: string;
    version_bump?: 'major' | 'minor' | 'patch';
    publish_version?: boolean;
    queue?: string;
    /** `[{key, content_base64}]`, or `{key: text or bytes}` (sent base64). */
    accessories?: Array<{ key: string; content_base64: string }> | Record<string, string | Uint8Array>;
    [field: string]: unknown;
  }

  export interface Workflow {
    workflow_ref_name?: string;
    [key: string]: unknown;
  }

  export interface Completions {
    create(params: CompletionCreateParamsNonStreaming, options?: InvokeOptions): Promise<ChatCompletion>;
    create(params: CompletionCreateParamsStreaming, options?: InvokeOptions): StreamPromise<StreamEvent>;
    create(params: CompletionCreateParams, options?: InvokeOptions):
      Promise<ChatCompletion> | StreamPromise<StreamEvent>;
  }

  export interface Runs {
    /** Everything kept of a run; with `wait` (seconds), answered once it ends or after `wait`. */
    get(requestId: string, params?: { wait?: number }, options?: RequestOptions): Promise<Run>;
    /** Follow a run from its start: its chunks (with `logs: true`, its log lines), then its completion. */
    stream(requestId: string, params?: { logs?: boolean }, options?: RequestOptions):
      StreamPromise<WorkflowChunk | WorkflowLog | ChatCompletion>;
  }

  export interface WorkflowRuns extends Runs {
    /** Start a run without waiting: its `request_id`, `status`, `status_url` and `stream_url`. */
    create(params: CompletionCreateParamsBase & { webhook_url?: string }, options?: InvokeOptions): Promise<Run>;
  }

  export interface WorkflowResource {
    completions: Completions;
    runs: WorkflowRuns;
  }

  export interface Workflows {
    upload(params: UploadParams, options?: RequestOptions): Promise<Record<string, unknown>>;
    get(ref: string, options?: RequestOptions): Promise<Workflow>;
    list(params?: PageParams, options?: RequestOptions): Promise<Page<Workflow>>;
    versions(ref: string, params?: PageParams, options?: RequestOptions): Promise<Page<Record<string, unknown>>>;
    activate(ref: string, params: { version: string }, options?: RequestOptions): Promise<Record<string, unknown>>;
    runs(ref: string, params?: PageParams, options?: RequestOptions): Promise<Page<Run>>;
    validate(params: { code: string; [field: string]: unknown }, options?: RequestOptions):
      Promise<{ ok: boolean; errors: Array<Record<string, unknown>> }>;
    delete(ref: string, options?: RequestOptions): Promise<Record<string, unknown>>;
  }

  /** The same client for code written against Maitai: MAITAI_API_KEY / MAITAI_BASE_URL first, the key sent as
   * X-Maitai-Api-Key. */
  export class Maitai extends Flowpool {}

  export const DEFAULT_BASE_URL: string;
  export const VERSION: string;

  export class FlowpoolError extends Error {}

  export class APIError extends FlowpoolError {
    constructor(status: number | undefined, body: unknown, headers: Headers | undefined, message?: string);
    /** The HTTP status; undefined when no answer came. */
    readonly status: number | undefined;
    /** The error's type, as the API names it (`not_found_error`, `rate_limit_exceeded`...). */
    readonly type: string | undefined;
    readonly code: number | undefined;
    readonly param: string | undefined;
    /** The body's `error` object. */
    readonly error: Record<string, unknown> | undefined;
    /** The answer's body as it came. */
    readonly body: unknown;
    readonly headers: Headers | undefined;
    /** The run the error is of, when it is a run's. */
    readonly requestId: string | undefined;
  }

  export class BadRequestError extends APIError {}
  export class AuthenticationError extends APIError {}
  export class NotFoundError extends APIError {}
  export class WorkflowTimeoutError extends APIError {}
  export class PayloadTooLargeError extends APIError {}
  export class UnprocessableEntityError extends APIError {}
  export class RateLimitError extends APIError {}
  export class InternalServerError extends APIError {}
  export class ServiceUnavailableError extends APIError {}

  export class APIConnectionError extends APIError {
    constructor(options?: { message?: string; cause?: unknown });
    readonly status: undefined;
  }
  export class APITimeoutError extends APIConnectionError {}
  export class APIUserAbortError extends APIError {
    constructor(options?: { message?: string; cause?: unknown });
    readonly status: undefined;
  }
}

export = Flowpool;
