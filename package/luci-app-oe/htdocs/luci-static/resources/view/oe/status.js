'use strict';
'require view';
'require poll';
'require rpc';
'require ui';
'require dom';

// Services -> Opportunistic IPsec -> Status: what oe-routerd does now, from its ubus
// object `oe` (src/oe_router/control/ubus_api.py; docs/luci.md). Polled every 5 s.
// Rows carry data- attributes (data-peer, data-state, data-auth ...) for scripts and
// tests; the write buttons (Flush, Down) are disabled without the write grant.

var callStatus = rpc.declare({ object: 'oe', method: 'status', expect: { '': {} } });
var callDevices = rpc.declare({ object: 'oe', method: 'devices', expect: { '': {} } });
var callFlush = rpc.declare({ object: 'oe', method: 'flush' });
var callDown = rpc.declare({ object: 'oe', method: 'down', params: [ 'peer' ] });
var callAccess = rpc.declare({
	object: 'session',
	method: 'access',
	params: [ 'scope', 'object', 'function' ],
	expect: { 'access': false }
});

var STATES = [ 'protected', 'clear', 'blocked', 'pending' ];

function age(seconds) {
	if (seconds == null || isNaN(seconds))
		return '-';
	var s = Math.floor(seconds);
	if (s < 60)
		return s + 's';
	if (s < 3600)
		return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
	if (s < 86400)
		return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
	return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
}

function bytes(n) {
	if (n == null)
		return '-';
	var units = [ 'B', 'KiB', 'MiB', 'GiB', 'TiB' ], i = 0, v = +n;
	while (v >= 1024 && i < units.length - 1) {
		v /= 1024;
		i++;
	}
	return (i ? v.toFixed(1) : String(v)) + ' ' + units[i];
}

/* A call that failed: the reply is a number (the ubus status) or has `error` */
function failed(reply) {
	if (reply == null || typeof(reply) != 'object')
		return _('no reply (ubus status %s): is oe-routerd running?').format(reply);
	return reply.error || null;
}

function table(id, headers, rows, empty) {
	var t = E('table', { 'class': 'table', 'id': id }, [
		E('tr', { 'class': 'tr table-titles' }, headers.map(function(h) {
			return E('th', { 'class': 'th' }, h);
		}))
	]);
	if (!rows.length)
		t.appendChild(E('tr', { 'class': 'tr placeholder', 'data-empty': '1' }, [
			E('td', { 'class': 'td', 'colspan': headers.length }, E('em', {}, empty))
		]));
	rows.forEach(function(r) { t.appendChild(r); });
	return t;
}

function cell(name, content) {
	return E('td', { 'class': 'td', 'data-title': name }, content);
}

/* The OE manager's row of a tunnel (bytes, age) and the IKE engine's (identities) */
function oeRow(tunnels, peer, selector) {
	var best = null;
	tunnels.forEach(function(t) {
		if (t.source == 'ike' || t.peer != peer)
			return;
		if (t.remote == selector || best == null)
			best = t;
	});
	return best;
}

function ikeRow(tunnels, peer) {
	return tunnels.filter(function(t) { return t.source == 'ike' && t.peer == peer; })[0] || null;
}

function auth(local, remote) {
	if (!local && !remote)
		return '-';
	return _('local %s, peer %s').format(local || '-', remote || '-');
}

return view.extend({
	load: function() {
		return Promise.all([
			L.resolveDefault(callStatus(), {}),
			L.resolveDefault(callDevices(), {}),
			L.resolveDefault(callAccess('ubus', 'oe', 'flush'), false),
			L.resolveDefault(callAccess('ubus', 'oe', 'down'), false)
		]);
	},

	/* write grants: the rpcd session's, and the menu node's (L.hasViewPermission) */
	canWrite: function(method) {
		return (this.access[method] === true) && (L.hasViewPermission() !== false);
	},

	handleFlush: function(ev) {
		return callFlush().then(L.bind(function(reply) {
			var why = failed(reply);
			if (why)
				ui.addNotification(null, E('p', { 'id': 'oe-action-error' }, _('Flush refused: %s').format(why)), 'error');
			else
				ui.addNotification(null, E('p', { 'id': 'oe-action-result' },
					_('Flushed %d shunt(s): the next flows to those destinations negotiate again.').format(reply.flushed || 0)), 'info');
			return this.refresh();
		}, this));
	},

	handleDown: function(peer, ev) {
		return callDown(peer).then(L.bind(function(reply) {
			var why = failed(reply);
			if (why)
				ui.addNotification(null, E('p', { 'id': 'oe-action-error' }, _('Down %s refused: %s').format(peer, why)), 'error');
			else
				ui.addNotification(null, E('p', { 'id': 'oe-action-result' },
					_('Took down %d IKE SA(s) with %s.').format(reply.deleted || 0, peer)), 'info');
			return this.refresh();
		}, this));
	},

	refresh: function() {
		return Promise.all([
			L.resolveDefault(callStatus(), {}),
			L.resolveDefault(callDevices(), {})
		]).then(L.bind(function(data) {
			this.update(data[0], data[1]);
		}, this));
	},

	renderDaemon: function(status) {
		var d = status.daemon;
		if (!d)
			return E('div', { 'id': 'oe-daemon', 'data-running': '0', 'class': 'alert-message warning' },
				_('oe-routerd does not answer on ubus: %s').format(failed(status) || _('no status')));
		var last = d.last_reload, reload = _('none yet');
		if (last)
			reload = last.accepted ? _('accepted (generation %d)').format(last.generation)
				: _('refused: %s').format((last.problems || []).join('; '));
		var rows = [
			[ 'version', _('Version'), d.version ],
			[ 'generation', _('Config generation'), d.config_generation ],
			[ 'enabled', _('Enabled'), d.enabled ? _('yes') : _('no') ],
			[ 'datapath', _('Datapath'), d.datapath ],
			[ 'uptime', _('Uptime'), age(d.uptime_s) ],
			[ 'services', _('Services'), (d.services || []).join(', ') ],
			[ 'last_reload', _('Last reload'), reload ]
		];
		return E('table', {
			'class': 'table', 'id': 'oe-daemon', 'data-running': '1',
			'data-generation': d.config_generation
		}, rows.map(function(r) {
			return E('tr', { 'class': 'tr', 'data-key': r[0] }, [
				E('td', { 'class': 'td left', 'width': '33%' }, r[1]),
				E('td', { 'class': 'td left' }, String(r[2]))
			]);
		}));
	},

	renderDevices: function(status, view) {
		var tunnels = status.tunnels || [], rows = [];
		(view.devices || []).forEach(function(dev) {
			/* fresh nodes for every row: a DOM node sits in one place only */
			var who = function() {
				var out = [ E('strong', {}, dev.address) ];
				if (dev.hostname)
					out.push(E('br'), dev.hostname);
				if (dev.mac)
					out.push(E('br'), E('small', {}, dev.mac));
				return out;
			};
			(dev.destinations || []).forEach(function(dst) {
				var ref = dst.tunnel || {}, row = ref.peer ? oeRow(tunnels, ref.peer, ref.selector) : null;
				var ids = ref.peer ? [ E('span', {}, _('peer id %s').format(ref.remote_id || '-')), E('br'),
					E('span', { 'class': 'oe-auth' }, auth(ref.local_auth, ref.remote_auth)) ] : '-';
				var reason = [ E('span', {}, dst.reason) ];
				if (dst.expires_s != null)
					reason.push(E('br'), E('small', {}, _('%s shunt, expires in %s').format(dst.shunt, age(dst.expires_s))));
				rows.push(E('tr', {
					'class': 'tr oe-destination',
					'data-device': dev.address,
					'data-destination': dst.address,
					'data-peer': ref.peer || dst.address,
					'data-state': dst.state,
					'data-auth': ref.remote_auth || ref.local_auth || '',
					'data-local-auth': ref.local_auth || '',
					'data-remote-auth': ref.remote_auth || '',
					'data-group': dst.group || '',
					'data-dns-name': dst.dns_name || ''
				}, [
					cell(_('Device'), who()),
					cell(_('Destination'), [ dst.address ].concat(dst.dns_name ? [ E('br'), E('small', {}, dst.dns_name) ] : [])),
					cell(_('State'), E('span', { 'class': 'oe-state oe-state-' + dst.state }, dst.state)),
					cell(_('Reason'), reason),
					cell(_('Peer'), ref.peer || '-'),
					cell(_('Identities and auth'), ids),
					cell(_('Algorithms'), ref.transform || '-'),
					cell(_('Engine'), ref.peer ? (ref.engine || _('kernel')) : '-'),
					cell(_('Bytes in/out'), row ? bytes(row.bytes_in) + ' / ' + bytes(row.bytes_out) : '-'),
					cell(_('Age'), row ? age(row.established_s) : '-'),
					cell(_('Flows'), String(dst.flows) + ((dst.services || []).length ? ' (' + dst.services.join(', ') + ')' : ''))
				]));
			});
		});
		var notes = (view.notes || []).slice();
		var why = failed(view);
		if (why)
			notes.push(why);
		if (view.truncated)
			notes.push(_('conntrack held more flows than the daemon reads at once; the list is cut short'));
		var counts = {};
		STATES.forEach(function(s) { counts[s] = 0; });
		(view.devices || []).forEach(function(dev) {
			counts.protected += dev.flows_protected || 0;
			counts.clear += dev.flows_clear || 0;
			counts.blocked += dev.flows_blocked || 0;
			counts.pending += dev.flows_pending || 0;
		});
		return E('div', { 'id': 'oe-devices-section' }, [
			E('p', { 'id': 'oe-flow-counts', 'data-protected': counts.protected, 'data-clear': counts.clear,
			         'data-blocked': counts.blocked, 'data-pending': counts.pending },
				_('Flows: %d protected, %d clear, %d blocked, %d pending').format(
					counts.protected, counts.clear, counts.blocked, counts.pending)),
			table('oe-devices', [ _('Device'), _('Destination'), _('State'), _('Reason'), _('Peer'),
				_('Identities and auth'), _('Algorithms'), _('Engine'), _('Bytes in/out'), _('Age'), _('Flows') ],
				rows, _('No LAN device has flows to the outside now.')),
			E('ul', { 'id': 'oe-devices-notes' }, notes.map(function(n) { return E('li', {}, n); }))
		]);
	},

	renderTunnels: function(status) {
		var tunnels = status.tunnels || [], canDown = this.canWrite('down'), self = this;
		/* one row per OE Child SA (with its IKE SA's identities), and the IKE SAs that
		 * carry none of them (`oe up`, a peer's own SA) */
		var oePeers = {};
		tunnels.forEach(function(t) { if (t.source != 'ike') oePeers[t.peer] = true; });
		var shown = tunnels.filter(function(t) { return t.source != 'ike' || !oePeers[t.peer]; });
		var rows = shown.map(function(t) {
			var ike = (t.source == 'ike') ? t : ikeRow(tunnels, t.peer);
			var btn = E('button', {
				'class': 'btn cbi-button cbi-button-negative oe-down',
				'data-peer': t.peer,
				'disabled': canDown ? null : true,
				'title': canDown ? _('Delete the IKE SA with %s and its Child SAs').format(t.peer)
					: _('Needs the write grant of luci-app-oe'),
				'click': canDown ? ui.createHandlerFn(self, 'handleDown', t.peer) : null
			}, _('Down'));
			return E('tr', {
				'class': 'tr oe-tunnel',
				'data-peer': t.peer,
				'data-state': t.state,
				'data-source': t.source || 'oe',
				'data-selector': t.remote,
				'data-auth': ike ? (ike.remote_auth || ike.local_auth || '') : '',
				'data-local-auth': ike ? ike.local_auth || '' : '',
				'data-remote-auth': ike ? ike.remote_auth || '' : ''
			}, [
				cell(_('Peer'), t.peer),
				cell(_('Selector'), t.remote || '-'),
				cell(_('State'), t.state + (t.policy ? ' (' + t.policy + ')' : '')),
				cell(_('Identities and auth'), ike ? [
					E('span', {}, _('%s / %s').format(ike.local_id || '-', ike.remote_id || '-')), E('br'),
					E('span', { 'class': 'oe-auth' }, auth(ike.local_auth, ike.remote_auth)) ] : '-'),
				cell(_('Algorithms'), t.transform || '-'),
				cell(_('Engine'), t.engine || (t.source == 'ike' ? '-' : _('kernel'))),
				cell(_('Bytes in/out'), t.source == 'ike' ? '-' : bytes(t.bytes_in) + ' / ' + bytes(t.bytes_out)),
				cell(_('Age'), age(t.established_s)),
				cell(_('Action'), btn)
			]);
		});
		return table('oe-tunnels', [ _('Peer'), _('Selector'), _('State'), _('Identities and auth'),
			_('Algorithms'), _('Engine'), _('Bytes in/out'), _('Age'), _('Action') ], rows, _('No tunnels.'));
	},

	renderShunts: function(status) {
		var rows = (status.shunts || []).map(function(s) {
			return E('tr', {
				'class': 'tr oe-shunt',
				'data-destination': s.destination,
				'data-peer': String(s.destination).split('/')[0],
				'data-kind': s.kind,
				'data-state': s.kind
			}, [
				cell(_('Destination'), s.destination),
				cell(_('Kind'), s.kind),
				cell(_('Reason'), s.reason || '-'),
				cell(_('Expires in'), s.expires_s == null ? _('never') : age(s.expires_s))
			]);
		});
		return table('oe-shunts', [ _('Destination'), _('Kind'), _('Reason'), _('Expires in') ], rows,
			_('No shunts.'));
	},

	renderDns: function(status) {
		var dns = status.dns || {};
		var rows = Object.keys(dns).sort().map(function(k) {
			var v = dns[k];
			if (Array.isArray(v))
				v = v.join(', ');
			else if (v != null && typeof(v) == 'object')
				v = JSON.stringify(v);
			return E('tr', { 'class': 'tr', 'data-key': k }, [
				cell(_('Counter'), k),
				cell(_('Value'), String(v))
			]);
		});
		return table('oe-dns', [ _('Counter'), _('Value') ], rows, _('The DNS front does not run.'));
	},

	update: function(status, devices) {
		dom.content(document.getElementById('oe-daemon-box'), this.renderDaemon(status));
		dom.content(document.getElementById('oe-devices-box'), this.renderDevices(status, devices));
		dom.content(document.getElementById('oe-tunnels-box'), this.renderTunnels(status));
		dom.content(document.getElementById('oe-shunts-box'), this.renderShunts(status));
		dom.content(document.getElementById('oe-dns-box'), this.renderDns(status));
	},

	render: function(data) {
		this.access = { flush: data[2] === true, down: data[3] === true };
		var canFlush = this.canWrite('flush');
		var page = E('div', { 'id': 'oe-status', 'data-writable': canFlush ? '1' : '0' }, [
			E('h2', {}, _('Opportunistic IPsec')),
			E('div', { 'class': 'cbi-map-descr' },
				_('Which LAN devices talk to whom, protected by a tunnel or in the clear, and why. Updated every 5 seconds.')),
			E('div', { 'class': 'cbi-section' }, [
				E('div', { 'id': 'oe-daemon-box' }, this.renderDaemon(data[0])),
				E('div', { 'class': 'right' }, E('button', {
					'class': 'btn cbi-button cbi-button-negative',
					'id': 'oe-flush',
					'disabled': canFlush ? null : true,
					'title': canFlush ? _('Remove every pass and drop shunt: the next flows negotiate again')
						: _('Needs the write grant of luci-app-oe'),
					'click': canFlush ? ui.createHandlerFn(this, 'handleFlush') : null
				}, _('Flush')))
			]),
			E('div', { 'class': 'cbi-section' }, [
				E('h3', {}, _('LAN devices')),
				E('div', { 'id': 'oe-devices-box' }, this.renderDevices(data[0], data[1]))
			]),
			E('div', { 'class': 'cbi-section' }, [
				E('h3', {}, _('Tunnels')),
				E('div', { 'id': 'oe-tunnels-box' }, this.renderTunnels(data[0]))
			]),
			E('div', { 'class': 'cbi-section' }, [
				E('h3', {}, _('Shunts')),
				E('div', { 'id': 'oe-shunts-box' }, this.renderShunts(data[0]))
			]),
			E('div', { 'class': 'cbi-section' }, [
				E('h3', {}, _('DNS front')),
				E('div', { 'id': 'oe-dns-box' }, this.renderDns(data[0]))
			])
		]);
		poll.add(L.bind(this.refresh, this), 5);
		return page;
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
