'use strict';
'require baseclass';

// The daemon's value grammars (src/oe_router/config/schema.py: parse_duration,
// parse_int, parse_choice, parse_bool, parse_abs_path, parse_offload, parse_ifname,
// parse_endpoint, parse_policy_entry, parse_local_id), one function per schema kind.
// Each takes a schema row (oe/schema.js, generated from validate.OPTIONS) and a value
// and returns { ok: true, value: <the daemon's canonical form> } or
// { ok: false, error: '<what is wrong>' }. Digits and white space are ASCII here: a
// value the daemon would take only with other Unicode digits is refused, never the
// other way round. tests/unit/test_luci_app.py runs this file under node against the
// Python parsers.

var HEX = /^[0-9A-Fa-f]{1,4}$/;
/* Python's white space (str.isspace, str.strip, str.split, \s of a str pattern) */
var WS = '\\t\\n\\x0b\\x0c\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
var PY_SPACE = new RegExp('[' + WS.replace('\\x1c-\\x20', '\\x1c-\\x1f') + ']');
var STRIP = new RegExp('^[' + WS + ']+|[' + WS + ']+$', 'g');
var SPLIT = new RegExp('[' + WS + ']+');
var DURATION = new RegExp('^([+-]?)([0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)[' + WS + ']*(ms|s|m|h)?$');
var UNIT = { ms: 0.001, s: 1, m: 60, h: 3600 };
var INTEGER = /^[+-]?[0-9]+(?:_[0-9]+)*$/;
var ENGINE = /^[A-Za-z0-9_.():,-]{1,96}$/;
var IFNAME = /^[A-Za-z0-9_.@-]{1,15}$/;
var LABEL = '[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?';
var FQDN = new RegExp('^(?=[^\\n]{1,253}$)' + LABEL + '(?:\\.' + LABEL + ')*\\.?$');
var TRUE = [ '1', 'yes', 'on', 'true', 'enabled' ];
var FALSE = [ '0', 'no', 'off', 'false', 'disabled' ];
var PROTO_NAMES = { 1: 'icmp', 6: 'tcp', 17: 'udp', 58: 'icmpv6', 132: 'sctp' };

function bad(error) { return { ok: false, error: error }; }
function good(value) { return { ok: true, value: value }; }

function strip(text) { return String(text).replace(STRIP, ''); }

/* format_duration: the shortest exact spelling (0.5 -> 500ms, 900 -> 15m) */
function formatDuration(seconds) {
	if (seconds == 0)
		return '0s';
	var units = [ [ 'h', 3600 ], [ 'm', 60 ], [ 's', 1 ] ];
	for (var i = 0; i < units.length; i++)
		if (seconds >= units[i][1] && seconds % units[i][1] == 0)
			return Math.floor(seconds / units[i][1]) + units[i][0];
	var ms = seconds * 1000;
	return (ms == Math.floor(ms)) ? ms + 'ms' : seconds + 's';
}

function parseIntText(text, lo, hi) {
	var t = strip(text);
	if (!INTEGER.test(t))
		return bad('is not a whole number (allowed: ' + lo + ' to ' + hi + ')');
	var n = parseInt(t.replace(/_/g, ''), 10);
	if (!(lo <= n && n <= hi))
		return bad('is out of range (allowed: ' + lo + ' to ' + hi + ')');
	return good(n);
}

/* IPv4: four decimal octets, no leading zeros (Python's ipaddress) */
function ip4(text) {
	var parts = text.split('.');
	if (parts.length != 4)
		return null;
	var n = 0;
	for (var i = 0; i < 4; i++) {
		var p = parts[i];
		if (!/^[0-9]{1,3}$/.test(p) || (p.length > 1 && p[0] == '0') || +p > 255)
			return null;
		n = n * 256 + (+p);
	}
	return n;
}

/* IPv6 as eight 16-bit numbers (at most one ::, an IPv4 tail), or null */
function ip6(text) {
	var parts = text.split(':');
	if (parts.length < 3)
		return null;
	if (parts[parts.length - 1].indexOf('.') >= 0) {
		var v4 = ip4(parts.pop());
		if (v4 == null)
			return null;
		parts.push((Math.floor(v4 / 65536)).toString(16), (v4 % 65536).toString(16));
	}
	if (parts.length > 9)
		return null;
	var skip = -1;
	for (var i = 1; i < parts.length - 1; i++)
		if (parts[i] === '') {
			if (skip >= 0)
				return null;
			skip = i;
		}
	var hi, lo;
	if (skip >= 0) {
		hi = skip;
		lo = parts.length - skip - 1;
		if (parts[0] === '' && --hi)
			return null;
		if (parts[parts.length - 1] === '' && --lo)
			return null;
		if (8 - (hi + lo) < 1)
			return null;
	}
	else {
		if (parts.length != 8 || parts[0] === '' || parts[7] === '')
			return null;
		hi = 8;
		lo = 0;
	}
	var words = [];
	for (var j = 0; j < hi; j++) {
		if (!HEX.test(parts[j]))
			return null;
		words.push(parseInt(parts[j], 16));
	}
	while (words.length < 8 - lo)
		words.push(0);
	for (var k = parts.length - lo; k < parts.length; k++) {
		if (!HEX.test(parts[k]))
			return null;
		words.push(parseInt(parts[k], 16));
	}
	return words;
}

/* str() of an IPv6 address: the longest run (two or more) of zero words as :: */
function format6(words) {
	var best = -1, bestLen = 0, start = -1;
	for (var i = 0; i <= 8; i++) {
		if (i < 8 && words[i] == 0) {
			if (start < 0)
				start = i;
		}
		else if (start >= 0) {
			if (i - start > bestLen) {
				best = start;
				bestLen = i - start;
			}
			start = -1;
		}
	}
	var hex = words.map(function(w) { return w.toString(16); });
	if (bestLen > 1) {
		var head = hex.slice(0, best).join(':'), tail = hex.slice(best + bestLen).join(':');
		return head + '::' + tail;
	}
	return hex.join(':');
}

function format4(n) {
	return [ n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255 ].join('.');
}

/* ip_address(): { version, words (v6) or n (v4), scope, text: its compressed form } */
function parseAddress(text) {
	if (text.indexOf('/') >= 0)
		return null;
	var v4 = ip4(text);
	if (v4 != null)
		return { version: 4, n: v4, text: format4(v4) };
	var addr = text, scope = '';
	var at = text.indexOf('%');
	if (at >= 0) {
		addr = text.substring(0, at);
		scope = text.substring(at + 1);
		if (scope === '' || scope.indexOf('%') >= 0)
			return null;
	}
	var words = ip6(addr);
	if (words == null)
		return null;
	return { version: 6, words: words, scope: scope,
	         text: format6(words) + (scope ? '%' + scope : '') };
}

function maskOnes(n) {
	/* a contiguous netmask of n (32 bit) as its prefix length, or -1 */
	for (var len = 0; len <= 32; len++) {
		var mask = len ? (0xffffffff << (32 - len)) >>> 0 : 0;
		if (mask == n)
			return len;
	}
	return -1;
}

function prefixOf(text, version) {
	if (/^[0-9]+$/.test(text)) {
		var len = parseInt(text, 10);
		return (len <= (version == 4 ? 32 : 128)) ? len : -1;
	}
	if (version != 4)
		return -1;
	var n = ip4(text);
	if (n == null)
		return -1;
	var len4 = maskOnes(n);
	return (len4 >= 0) ? len4 : maskOnes((~n) >>> 0);
}

/* ip_network(text, strict): { version, prefix, net, text } or a string (why not) */
function parseNetwork(text, strict) {
	var parts = text.split('/');
	if (parts.length > 2)
		return 'invalid';
	var addr = parseAddress(parts[0]);
	if (addr == null)
		return 'invalid';
	var max = (addr.version == 4) ? 32 : 128;
	var prefix = (parts.length == 2) ? prefixOf(parts[1], addr.version) : max;
	if (prefix < 0)
		return 'invalid';
	var hostbits = false, netText;
	if (addr.version == 4) {
		var mask = prefix ? (0xffffffff << (32 - prefix)) >>> 0 : 0;
		var net = (addr.n & mask) >>> 0;
		hostbits = (net != addr.n);
		netText = format4(net);
	}
	else {
		var words = addr.words.map(function(w, i) {
			var bits = Math.min(Math.max(prefix - 16 * i, 0), 16);
			var m = bits ? (0xffff << (16 - bits)) & 0xffff : 0;
			if ((w & m) != w)
				hostbits = true;
			return w & m;
		});
		netText = format6(words) + (addr.scope ? '%' + addr.scope : '');
	}
	if (hostbits && strict)
		return 'hostbits';
	return { version: addr.version, prefix: prefix, text: netText + '/' + prefix };
}

var ENDPOINT_HINT = 'use IP:port or [IPv6]:port, e.g. 127.0.0.1:53 or [::1]:53';

function parseEndpoint(text) {
	var s = strip(text), host = s, portText = null;
	if (s[0] == '[') {
		var end = s.indexOf(']');
		if (end < 0)
			return bad('has an unclosed [ (' + ENDPOINT_HINT + ')');
		host = s.substring(1, end);
		var rest = s.substring(end + 1);
		if (rest) {
			if (rest[0] != ':')
				return bad('is not an address (' + ENDPOINT_HINT + ')');
			portText = rest.substring(1);
		}
	}
	else if (s.split(':').length == 2) {
		host = s.split(':')[0];
		portText = s.split(':')[1];
	}
	var addr = parseAddress(host);
	if (addr == null)
		return bad('is not an IP address with optional port (' + ENDPOINT_HINT + ')');
	if (s[0] == '[' && addr.version != 6)
		return bad('puts an IPv4 address in [] (' + ENDPOINT_HINT + ')');
	var port = 53;
	if (portText != null) {
		if (!/^[0-9]+$/.test(portText) || !(+portText >= 1 && +portText <= 65535))
			return bad('has a bad port (1 to 65535; ' + ENDPOINT_HINT + ')');
		port = +portText;
	}
	return good(addr.version == 6 ? '[' + addr.text + ']:' + port : addr.text + ':' + port);
}

function parsePolicyDest(text, doc) {
	var words = String(text).split(SPLIT).filter(function(w) { return w !== ''; });
	if (words.length < 1 || words.length > 3)
		return bad("is not 'CIDR [proto [port]]' (e.g. 192.0.2.0/24 tcp 443)");
	var net = parseNetwork(words[0], true);
	if (net == 'hostbits') {
		var loose = parseNetwork(words[0], false);
		return bad('has host bits set (did you mean ' + loose.text + '?)');
	}
	if (typeof(net) == 'string')
		return bad('has no valid CIDR (e.g. 192.0.2.0/24 or 2001:db8::/32)');
	var protocols = doc.protocols, proto = null, port = null;
	if (words.length >= 2) {
		var p = words[1].toLowerCase();
		if (Object.prototype.hasOwnProperty.call(protocols, p))
			proto = protocols[p];
		else if (/^[0-9]+$/.test(p) && +p <= 255)
			proto = +p;
		else {
			var names = Object.keys(protocols).filter(function(n) { return n != 'ipv6-icmp'; });
			return bad("has an unknown protocol '" + words[1] + "' (use " + names.join(', ') + ' or 0 to 255)');
		}
		if (proto == 1 && net.version == 6)
			return bad('uses icmp with an IPv6 network (use icmpv6)');
		if (proto == 58 && net.version == 4)
			return bad('uses icmpv6 with an IPv4 network (use icmp)');
	}
	if (words.length == 3) {
		if (doc.port_protocols.indexOf(proto) < 0)
			return bad('has a port, but ports need tcp, udp or sctp');
		if (!/^[0-9]+$/.test(words[2]) || !(+words[2] >= 1 && +words[2] <= 65535))
			return bad("has a bad port '" + words[2] + "' (1 to 65535)");
		port = +words[2];
	}
	var out = [ net.text ];
	if (proto != null)
		out.push(PROTO_NAMES[proto] || String(proto));
	if (port != null)
		out.push(String(port));
	return good(out.join(' '));
}

var KINDS = {
	bool: function(row, text) {
		var low = strip(text).toLowerCase();
		if (TRUE.indexOf(low) >= 0)
			return good(true);
		if (FALSE.indexOf(low) >= 0)
			return good(false);
		return bad('is not a boolean (use 1 or 0)');
	},

	choice: function(row, text) {
		if (row.choices.indexOf(text) >= 0)
			return good(text);
		return bad('is not allowed (use one of: ' + row.choices.join(', ') + ')');
	},

	duration: function(row, text) {
		var allowed = 'allowed: ' + formatDuration(row.min) + ' to ' + formatDuration(row.max);
		var m = DURATION.exec(strip(text));
		if (m == null)
			return bad('is not a duration (use e.g. 3s, 500ms, 15m, 8h; ' + allowed + ')');
		var seconds = parseFloat(m[2]) * (m[3] ? UNIT[m[3]] : 1);
		if (m[1] == '-' && seconds != 0)
			return bad('is negative (' + allowed + ')');
		if (!(row.min <= seconds && seconds <= row.max))
			return bad('is out of range (' + allowed + ')');
		return good(seconds);
	},

	int: function(row, text) {
		var t = strip(text);
		if (row.suffix && t.length >= row.suffix.length &&
		    t.substring(t.length - row.suffix.length) == row.suffix)
			t = t.substring(0, t.length - row.suffix.length);
		var r = parseIntText(t, row.min, row.max);
		if (r.ok && row.gap && r.value != 0 && !(row.gap[0] <= r.value && r.value <= row.gap[1]))
			return bad('is out of range (allowed: 0 for off, or ' + row.gap[0] + ' to ' + row.gap[1] + ')');
		return r;
	},

	abs_path: function(row, text) {
		if (text[0] != '/')
			return bad('is not an absolute path (start it with /)');
		if (new TextEncoder().encode(text).length > row.max_len)
			return bad('is too long (at most ' + row.max_len + ' bytes)');
		if (PY_SPACE.test(text))
			return bad('contains a control character');
		return good(text);
	},

	offload: function(row, text) {
		if (text == 'auto' || text == 'off' || ENGINE.test(text))
			return good(text);
		return bad('is not auto, off or an engine name (e.g. virtio_crypto_aes_cbc, afalg, cryptodev)');
	},

	ifname: function(row, text) {
		if (IFNAME.test(text) && text != '.' && text != '..')
			return good(text);
		return bad('is not a network or device name (1-15 of A-Z a-z 0-9 _ . @ -, e.g. wan or eth0.2)');
	},

	endpoint: function(row, text) {
		return parseEndpoint(text);
	},

	policy_dest: function(row, text, doc) {
		return parsePolicyDest(text, doc);
	},

	local_id: function(row, text) {
		if (text == '%null')
			return good(text);
		if (text[0] == '@') {
			if (FQDN.test(text.substring(1)))
				return good(text);
			return bad('is not @ followed by a host name (e.g. @router.example.org)');
		}
		var addr = parseAddress(text);
		return addr ? good(addr.text) : bad('is not %null, @fqdn or an IP address');
	}
};

return baseclass.extend({
	formatDuration: formatDuration,

	/* One value against its schema row: { ok, value } or { ok: false, error } */
	check: function(doc, row, text) {
		var fn = KINDS[row.kind];
		if (fn == null)
			return bad('has no validator for kind ' + row.kind);
		return fn(row, String(text), doc);
	},

	/* What a row accepts, in words (the form's help text under a field) */
	describe: function(row) {
		switch (row.kind) {
		case 'duration':
			return 'a duration from ' + row.min_text + ' to ' + row.max_text + ' (e.g. 500ms, 3s, 15m, 8h)';
		case 'int':
			if (row.gap)
				return '0 (off) or ' + row.gap[0] + ' to ' + row.gap[1];
			return 'a whole number from ' + row.min + ' to ' + row.max + (row.suffix ? ' (' + row.suffix + ' may follow)' : '');
		case 'abs_path':
			return 'an absolute path (at most ' + row.max_len + ' bytes)';
		case 'endpoint':
			return 'an IP address with optional port: 127.0.0.1:53, [::1]:53 (port 53 if none)';
		case 'policy_dest':
			return 'CIDR [proto [port]], e.g. 192.0.2.0/24, 2001:db8::/32 tcp 443';
		case 'ifname':
			return 'an OpenWrt network (wan) or a device name (eth0.2)';
		case 'offload':
			return 'auto, off, or a crypto engine or driver name';
		case 'local_id':
			return '%null (NULL authentication), @fqdn, or an IP address';
		default:
			return '';
		}
	}
});
