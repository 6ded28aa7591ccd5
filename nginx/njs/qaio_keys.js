// API keys at the front door (QAIO_API_KEYS_FILE): who a request's `Authorization: Bearer <key>` is,
// and the limit classes of that key, as one nginx variable ($qaio_key, js_set).
//
// The file is read on every request that needs the variable (a few hundred bytes to a few KB; the page
// cache serves it), so a key added or revoked takes effect at once, without a reload. Each line:
//   <name>:sha256:<64 hex digits of SHA-256 of the key> [rate=<n>r/s|<n>r/m] [conn=<n>]
// '#' starts a comment. Only the hash is stored; a wrong line is skipped (nginx logs it at start, where
// qaio-env.envsh checks the file, and here at warn level).
//
// $qaio_key is "<name>/<rate class in r/m>/<conn class>", or "" when the key is missing or wrong.
// nginx's own limit_req and limit_conn zones do the limiting: one zone per class (RATE_CLASSES,
// CONN_CLASSES, the same lists qaio-env.envsh renders), so a key's limit is the largest class not
// above what its line asks for.
var fs = require('fs');
var crypto = require('crypto');

var RATE_CLASSES = [1, 2, 6, 12, 30, 60, 120, 300, 600, 1200, 3000, 6000, 12000, 30000, 60000, 120000, 300000, 600000];  // requests/minute
var CONN_CLASSES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
var LINE = /^([A-Za-z0-9._-]{1,64}):sha256:([0-9a-f]{64})((?:\s+(?:rate=\d+r\/[sm]|conn=\d+))*)\s*$/;
var BEARER = /^bearer +([\x21-\x7e]{1,512})$/i;  // the scheme is case-insensitive (RFC 9110)

function classOf(value, classes) {
    var chosen = classes[0];
    for (var i = 0; i < classes.length; i++) {
        if (classes[i] <= value) {
            chosen = classes[i];
        }
    }
    return chosen;
}

function perMinute(rate) {
    var n = parseInt(rate, 10);
    return rate.endsWith('r/s') ? n * 60 : n;
}

function lookup(r, digest) {
    var text;
    try {
        text = fs.readFileSync(r.variables.qaio_keys_file, 'utf8');
    } catch (e) {
        r.warn('qaio: cannot read the API keys file: ' + e.message);
        return '';
    }
    var lines = text.split('\n');
    for (var i = 0; i < lines.length; i++) {
        var line = lines[i].replace(/#.*/, '').trim();
        if (line === '') {
            continue;
        }
        var m = LINE.exec(line);
        if (m === null) {
            r.warn('qaio: API keys file line ' + (i + 1) + ' is not <name>:sha256:<hex> [rate=] [conn=]; skipped');
            continue;
        }
        if (m[2] !== digest) {
            continue;
        }
        var rate = perMinute(r.variables.qaio_key_default_rate);
        var conn = parseInt(r.variables.qaio_key_default_conn, 10);
        m[3].trim().split(/\s+/).forEach(function (field) {
            if (field.startsWith('rate=')) {
                rate = perMinute(field.slice(5));
            } else if (field.startsWith('conn=')) {
                conn = parseInt(field.slice(5), 10);
            }
        });
        return m[1] + '/' + classOf(rate, RATE_CLASSES) + '/' + classOf(conn, CONN_CLASSES);
    }
    return '';
}

function key(r) {
    var m = BEARER.exec(r.headersIn.Authorization || '');
    if (m === null) {
        return '';
    }
    return lookup(r, crypto.createHash('sha256').update(m[1]).digest('hex'));
}

export default {key};
