#!/usr/bin/env node
// Reference oracle for tests/fwrule_differential.rs: runs Joyent's `fwrule` package (pinned in
// package.json / package-lock.json) on rules read from stdin, one JSON object per line:
//   {"rule": "...", "maxVersion": 3 | null, "enforceSubnetMask": true | false}
// and writes one JSON line per input:
//   {"parse":  {"ok": true, "tree": <parse() result>} | {"ok": false, "class": ..., "message": ...},
//    "create": {"ok": true, "canonical": <create().text()>} | {"ok": false, "class": ..., "message": ...}}
// The class of a rejection is read off upstream's message: syntax (the jison lexer/parser),
// version (maxVersion), model (create() checks after a successful parse), value (the rest).
'use strict';

var fwrule = require('fwrule');
var readline = require('readline');

function classify(err) {
    var msg = String(err && err.message);
    if (!(err instanceof fwrule.validators.InvalidParamError)) {
        return 'internal';
    }
    if (/^Error at character /.test(msg)) {
        return 'syntax';
    }
    if (/newer than this API allows$/.test(msg)) {
        return 'version';
    }
    if (msg === 'rule does not affect VMs' || /^rule affects ICMPv[46] but contains/.test(msg)) {
        return 'model';
    }
    return 'value';
}

// A string as it leaves on a UTF-8 channel: lone surrogates become U+FFFD.
function wellFormed(s) {
    return typeof (s.toWellFormed) === 'function' ? s.toWellFormed() : s;
}

function fixTree(v) {
    if (typeof (v) === 'string') {
        return wellFormed(v);
    }
    if (Array.isArray(v)) {
        return v.map(fixTree);
    }
    if (v && typeof (v) === 'object') {
        var o = {};
        Object.keys(v).forEach(function (k) { o[k] = fixTree(v[k]); });
        return o;
    }
    return v;
}

function run(input) {
    var opts = {};
    if (input.maxVersion !== null && input.maxVersion !== undefined) {
        opts.maxVersion = input.maxVersion;
    }
    if (input.enforceSubnetMask) {
        opts.enforceSubnetMask = true;
    }
    var out = {};
    try {
        out.parse = {ok: true, tree: fixTree(fwrule.parse(input.rule, opts))};
    } catch (e) {
        out.parse = {ok: false, class: classify(e), message: wellFormed(String(e.message))};
    }
    try {
        out.create = {ok: true, canonical: wellFormed(fwrule.create({rule: input.rule}, opts).text())};
    } catch (e) {
        out.create = {ok: false, class: classify(e), message: wellFormed(String(e.message))};
    }
    return out;
}

if (process.argv[2] === '--version') {
    process.stdout.write(require('fwrule/package.json').version + '\n');
    process.exit(0);
}

var rl = readline.createInterface({input: process.stdin, crlfDelay: Infinity, terminal: false});
rl.on('line', function (line) {
    if (line.trim() === '') {
        return;
    }
    var res;
    try {
        res = run(JSON.parse(line));
    } catch (e) {
        res = {error: String(e && e.message)};
    }
    process.stdout.write(JSON.stringify(res) + '\n');
});
