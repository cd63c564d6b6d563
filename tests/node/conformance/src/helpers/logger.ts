// Vendored by Portcullis from https://github.com/modelcontextprotocol/typescript-sdk
//   path:   test/conformance/src/helpers/logger.ts
//   commit: 3924de99df834302d89f5997a1b64ca268282284
// License: the typescript-sdk repository's MIT License (Copyright (c) 2024-2025 Model Context
// Protocol a Series of LF Projects, LLC), with new contributions there under Apache-2.0 during
// its licensing transition; the full text of that LICENSE is in LICENSE.typescript-sdk beside
// this project's package.json.
// Portcullis changes: none.

/**
 * Simple logger with configurable log levels.
 * Set to 'error' in tests to suppress debug output.
 */

export type LogLevel = 'debug' | 'error';

let currentLogLevel: LogLevel = 'debug';

export function setLogLevel(level: LogLevel): void {
    currentLogLevel = level;
}

export function getLogLevel(): LogLevel {
    return currentLogLevel;
}

export const logger = {
    debug: (...args: unknown[]): void => {
        if (currentLogLevel === 'debug') {
            console.log(...args);
        }
    },
    error: (...args: unknown[]): void => {
        console.error(...args);
    }
};
